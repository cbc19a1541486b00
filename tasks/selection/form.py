"""`selection_config`: the Lightly Worker's selection form, a list of strategies on inputs.

    selection_config={"n_samples": 100, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}},
        {"input": {"type": "SCORES", "task": "weather", "score": "uncertainty_margin"},
         "strategy": {"type": "WEIGHTS", "strength": 0.5}}]}

Each strategy scores every candidate from its input; THRESHOLD strategies filter first, the rest
combine greedily, one sample at a time, by the product of their scores raised to their strengths
(`tasks/selection/strategies.py`). The plain keys (`method`, `stopping_condition.*`) mean one such
list (`plain_strategies`), so there is one selection engine.

    >>> form = SelectionForm.model_validate({"proportion_samples": 0.1, "strategies": [
    ...     {"input": {"type": "METADATA", "key": "lightly.sharpness"},
    ...      "strategy": {"type": "THRESHOLD", "threshold": 20, "operation": "BIGGER"}}]})
    >>> form.strategies[0].strategy.operation
    'BIGGER'
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Lightly's range for a strategy's strength.
MAX_STRENGTH = 1e9


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddingsInput(_Form):
    type: Literal["EMBEDDINGS"]
    query: str | None = Field(
        None,
        description="SIMILARITY's query set: a text file of filenames (relative to input_dir, one per line), "
        "or a folder of samples inside input_dir; the path is relative to shared_dir for a file, input_dir for "
        "a folder.",
    )


class ScoresInput(_Form):
    type: Literal["SCORES"]
    task: str = Field(description="A prediction task in .lightly/predictions/tasks.json.")
    score: str = Field(description="An active-learning score of that task, e.g. uncertainty_margin.")


class MetadataInput(_Form):
    type: Literal["METADATA"]
    key: str = Field(description="lightly.<name> (computed by the check) or a path in .lightly/metadata/schema.json.")


class PredictionsInput(_Form):
    type: Literal["PREDICTIONS"]
    task: str
    name: Literal["CLASS_DISTRIBUTION", "CATEGORY_COUNT"]
    categories: list[str] | None = Field(None, description="CATEGORY_COUNT counts only these categories.")


class RandomInput(_Form):
    type: Literal["RANDOM"]
    random_seed: int | None = Field(None, description="Seed of the random values; default lightly.seed.")


Input = Annotated[
    EmbeddingsInput | ScoresInput | MetadataInput | PredictionsInput | RandomInput, Field(discriminator="type")
]


def input_label(given: Input) -> str:
    """An input as the report names it, e.g. 'SCORES weather.uncertainty_margin'."""
    detail = {
        "EMBEDDINGS": getattr(given, "query", None) and f"query {given.query}",
        "SCORES": getattr(given, "score", None) and f"{given.task}.{given.score}",
        "METADATA": getattr(given, "key", None),
        "PREDICTIONS": getattr(given, "name", None) and f"{given.task}.{given.name}",
    }.get(given.type)
    return f"{given.type} {detail}" if detail else given.type


Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH)]


class Diversity(_Form):
    type: Literal["DIVERSITY"]
    strength: float = Field(1.0, gt=0, le=MAX_STRENGTH, description="Exponent of the distance to the selection.")
    stopping_condition_minimum_distance: float | None = Field(
        None, ge=0, description="No two selected samples closer than this."
    )


class Weights(_Form):
    type: Literal["WEIGHTS"]
    strength: Strength = 1.0
    stopping_condition_max_sum: float | None = Field(
        None, description="Stop once the selected samples' input values sum to this."
    )


class Threshold(_Form):
    type: Literal["THRESHOLD"]
    threshold: float
    operation: Literal["BIGGER", "BIGGER_EQUAL", "SMALLER", "SMALLER_EQUAL"]


class Balance(_Form):
    type: Literal["BALANCE"]
    strength: Strength = 1.0
    target: dict[str, float] | None = Field(
        None, description="Share of each class in the selection; the rest of 1 goes to the other classes."
    )
    distribution: Literal["TARGET", "UNIFORM", "INPUT"] | None = Field(
        None, description="TARGET (needs target), UNIFORM over the classes, or INPUT (as in the input)."
    )

    @model_validator(mode="after")
    def _check_target(self) -> Balance:
        distribution = self.distribution or ("TARGET" if self.target else "UNIFORM")
        if distribution == "TARGET" and not self.target:
            raise ValueError("distribution TARGET needs target, e.g. {'car': 0.5, 'bus': 0.5}")
        if self.target is not None and distribution != "TARGET":
            raise ValueError(f"target is set but distribution is {distribution}; leave one out")
        if self.target and (min(self.target.values()) < 0 or sum(self.target.values()) > 1 + 1e-9):
            raise ValueError("target shares must be >= 0 and sum to at most 1")
        return self.model_copy(update={"distribution": distribution}) if self.distribution is None else self


class Similarity(_Form):
    type: Literal["SIMILARITY"]
    strength: Strength = 1.0


class Typicality(_Form):
    type: Literal["TYPICALITY"]
    strength: Strength = 1.0
    num_nearest_neighbors: int = Field(20, ge=2, description="k of the k nearest neighbours that measure density.")
    stopping_condition_minimum_typicality: float | None = Field(
        None, gt=0, description="Stop when the next pick is less typical than this."
    )


Strategy = Annotated[Diversity | Weights | Threshold | Balance | Similarity | Typicality, Field(discriminator="type")]

# The inputs each strategy accepts (Lightly's "Input and Strategy Combinations"); PREDICTIONS by name.
ACCEPTS = {
    "DIVERSITY": {"EMBEDDINGS"},
    "TYPICALITY": {"EMBEDDINGS"},
    "SIMILARITY": {"EMBEDDINGS"},
    "WEIGHTS": {"SCORES", "METADATA", "RANDOM", "CATEGORY_COUNT"},
    "THRESHOLD": {"SCORES", "METADATA", "RANDOM", "CATEGORY_COUNT"},
    "BALANCE": {"METADATA", "CLASS_DISTRIBUTION"},
}


class StrategyEntry(_Form):
    input: Input
    strategy: Strategy

    @model_validator(mode="after")
    def _check_pair(self) -> StrategyEntry:
        kind = self.input.name if isinstance(self.input, PredictionsInput) else self.input.type
        accepted = ACCEPTS[self.strategy.type]
        if kind not in accepted:
            raise ValueError(
                f"{self.strategy.type} cannot use input {kind}; it takes {' or '.join(sorted(accepted))} "
                "(PREDICTIONS by name: CLASS_DISTRIBUTION or CATEGORY_COUNT)"
            )
        if (self.strategy.type == "SIMILARITY") != (isinstance(self.input, EmbeddingsInput) and bool(self.input.query)):
            raise ValueError("SIMILARITY needs input.query (the query set), and only SIMILARITY takes one")
        return self


class SelectionForm(_Form):
    """The Worker's `selection_config` (SelectionConfigV4): a size and at least one strategy."""

    n_samples: int | None = Field(None, ge=-1, description="Samples to select; -1 means no count limit.")
    proportion_samples: float | None = Field(None, gt=0, le=1, description="Fraction of the candidates to select.")
    strategies: list[StrategyEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_size(self) -> SelectionForm:
        if self.n_samples is not None and self.proportion_samples is not None:
            raise ValueError("set n_samples or proportion_samples, not both")
        if self.samples is None and not self.stops_by_itself:
            raise ValueError(
                "set n_samples or proportion_samples, or a strategy's stopping condition "
                "(DIVERSITY stopping_condition_minimum_distance, WEIGHTS stopping_condition_max_sum, "
                "TYPICALITY stopping_condition_minimum_typicality)"
            )
        return self

    @property
    def samples(self) -> int | float | None:
        """The size as SelectOptions takes it: a count, a fraction in (0, 1], or None."""
        if self.proportion_samples is not None:
            return float(self.proportion_samples)
        return None if self.n_samples in (None, -1) else self.n_samples

    @property
    def min_distance(self) -> float | None:
        """DIVERSITY's stopping_condition_minimum_distance (the config allows one DIVERSITY at most)."""
        limits = [getattr(entry.strategy, "stopping_condition_minimum_distance", None) for entry in self.strategies]
        return next((limit for limit in limits if limit is not None), None)

    @property
    def stops_by_itself(self) -> bool:
        return any(
            getattr(entry.strategy, key, None) is not None
            for entry in self.strategies
            for key in (
                "stopping_condition_minimum_distance",
                "stopping_condition_max_sum",
                "stopping_condition_minimum_typicality",
            )
        )
