"""What each `selection_config` strategy scores, for every candidate: its input, resolved.

EMBEDDINGS are the candidates' own vectors (SIMILARITY's `query` names some of them: a file of
filenames in shared_dir, or a folder of input_dir); RANDOM is a seeded uniform draw; METADATA
`lightly.*` keys are the check stage's measures (the run's samples table), other keys the user's
`.lightly/metadata`; SCORES and PREDICTIONS come from the user's `.lightly/predictions`, whose
active-learning scores are computed here. A sample without a value gets NaN, and what could not
be read is kept as a problem (filename, reason) for the report instead of stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
from upath import UPath

from tasks.image_metadata import LIGHTLY_METADATA, sample_metadata
from tasks.predictions.formats import Problem, read_tasks
from tasks.predictions.metadata import METADATA, read_metadata
from tasks.predictions.metadata import read_schema as read_metadata_schema
from tasks.predictions.predictions import read_predictions
from tasks.predictions.scores import ScorerOptions, category_count, class_distribution, scores
from tasks.selection.form import (
    EmbeddingsInput,
    Input,
    MetadataInput,
    PredictionsInput,
    RandomInput,
    ScoresInput,
    SelectionForm,
)
from tasks.selection.strategies import Planned, Scored
from tasks.storage import read_table
from tasks.video.sequences import frame_infos


@dataclass(frozen=True)
class InputSources:
    """Where the inputs live, and the settings that shape them (the flow builds this from its config)."""

    lightly_root: UPath  # the folder that holds .lightly/ (lightly_dir, or input_dir)
    shared_base: UPath  # where SIMILARITY's query files are
    seed: int
    scorer: ScorerOptions


@dataclass(frozen=True)
class RunTables:
    """The run's tables that strategies read and write: the samples (the check stage's measures; None
    for a run from embeddings=), the videos (whose frames take their video's metadata) and where the
    active-learning scores go (None: not written)."""

    samples: UPath | None = None
    videos: UPath | None = None
    scores: UPath | None = None


@dataclass
class Readers:
    """The inputs of one selection, each file read once however many strategies use it."""

    sources: InputSources
    filenames: list[str]
    vectors: np.ndarray
    tables: RunTables
    problems: list[Problem] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # every score of the tasks used, by task.score
    _predictions: dict = field(default_factory=dict)

    def scored(self, given: Input, strategy: str) -> Scored:
        """The input of a strategy of type `strategy` (BALANCE takes METADATA values as categories)."""
        if isinstance(given, EmbeddingsInput):
            return Scored(query=None if given.query is None else self.vectors[self.query_rows(given.query)])
        if isinstance(given, RandomInput):
            seed = self.sources.seed if given.random_seed is None else given.random_seed
            return Scored(values=np.random.default_rng(seed).random(len(self.filenames)))
        if isinstance(given, MetadataInput):
            values = self.metadata(given.key)
            return categories(values) if strategy == "BALANCE" else Scored(values=numeric(values, given.key))
        task, predictions = self.predictions(given.task)
        if isinstance(given, ScoresInput):
            named = scores(task, predictions, self.sources.scorer)
            self.scores |= {f"{task.name}.{name}": values for name, values in named.items()}
            if given.score not in named:
                raise ValueError(
                    f"SCORES input: task {given.task!r} ({task.task_type}) has no score {given.score!r}; "
                    f"its scores are {', '.join(sorted(named))}"
                )
            return Scored(values=named[given.score])
        assert isinstance(given, PredictionsInput)
        if given.name == "CATEGORY_COUNT":
            return Scored(values=category_count(task, predictions, given.categories))
        return Scored(classes=class_distribution(task, predictions, given.name), class_names=task.category_names)

    @cached_property
    def tasks(self) -> dict:
        return read_tasks(self.sources.lightly_root)

    def predictions(self, name: str) -> tuple:
        if name not in self._predictions:
            task = self.tasks[name]  # check_inputs made sure that it is there
            sizes = self.sizes
            predictions, problems = read_predictions(self.sources.lightly_root, task, self.filenames, *sizes)
            self.problems += problems
            self._predictions[name] = (task, predictions)
        return self._predictions[name]

    @cached_property
    def samples(self) -> pa.Table | None:
        """The run's samples table as rows in candidate order (None for a run from embeddings=)."""
        if self.tables.samples is None:
            return None
        table = read_table(self.tables.samples)
        row = {name: i for i, name in enumerate(table.column("filename").to_pylist())}
        return table.take(pa.array([row.get(name) for name in self.filenames], pa.int64()))

    @property
    def sizes(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Each candidate's width and height, for checking prediction boxes (None when unknown)."""
        if self.samples is None:
            return None, None
        return tuple(self.samples.column(c).to_numpy(zero_copy_only=False).astype(float) for c in ("width", "height"))

    @cached_property
    def custom_metadata(self) -> dict[str, np.ndarray]:
        frames = frame_infos(read_table(self.tables.videos)) if self.tables.videos is not None else {}
        videos = [frames[name].video if name in frames else None for name in self.filenames]
        values, problems = read_metadata(self.sources.lightly_root, self.filenames, videos)
        self.problems += problems
        return values

    def metadata(self, key: str) -> np.ndarray:
        # check_inputs made sure that the key exists, and the config that a lightly.* key comes with a check stage.
        return sample_metadata(self.samples, key) if key.startswith("lightly.") else self.custom_metadata[key]

    def query_rows(self, query: str) -> np.ndarray:
        """SIMILARITY's query set as candidate rows: the names listed in the shared_dir file `query`,
        else the candidates under the input_dir folder `query`."""
        listing = self.sources.shared_base / query
        if listing.is_file():
            wanted = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
            rows = [i for i, name in enumerate(self.filenames) if name in wanted]
        else:
            prefix = query.strip("/") + "/"
            rows = [i for i, name in enumerate(self.filenames) if name.startswith(prefix)]
        if not rows:
            raise ValueError(
                f"SIMILARITY query {query!r} names no candidate: it is neither a file of filenames in shared_dir "
                f"({self.sources.shared_base}) listing usable samples, nor a folder of input_dir holding some"
            )
        return np.asarray(rows)


def numeric(values: np.ndarray, key: str) -> np.ndarray:
    if values.dtype == object:
        raise ValueError(f"METADATA {key} holds strings (CATEGORICAL_STRING): only BALANCE can use it")
    return values


def categories(values: np.ndarray) -> Scored:
    """Metadata values as BALANCE's classes: one per distinct value, a sample without one in none."""
    known = [value for value in values.tolist() if value is not None and value == value]  # NaN != NaN
    names = sorted({str(value) for value in known})
    column = {name: i for i, name in enumerate(names)}
    classes = np.zeros((len(values), len(names)))
    for row, value in enumerate(values.tolist()):
        if value is not None and value == value:
            classes[row, column[str(value)]] = 1.0
    return Scored(classes=classes, class_names=tuple(names))


def check_inputs(form: SelectionForm, sources: InputSources) -> None:
    """What can be known before any work: the prediction tasks, categories and metadata keys that the
    strategies name exist. Raises ValueError naming the strategy."""
    tasks = None
    for i, entry in enumerate(form.strategies):
        given, where = entry.input, f"selection_config.strategies[{i}].input"
        if isinstance(given, (ScoresInput, PredictionsInput)):
            tasks = read_tasks(sources.lightly_root) if tasks is None else tasks
            if given.task not in tasks:
                raise ValueError(
                    f"{where}.task={given.task!r} is not in {sources.lightly_root}/.lightly/predictions/tasks.json "
                    f"(its tasks: {', '.join(sorted(tasks)) or 'none'})"
                )
            unknown = sorted(set(getattr(given, "categories", None) or ()) - set(tasks[given.task].category_names))
            if unknown:
                raise ValueError(f"{where}.categories: task {given.task!r} has no categories {unknown}")
        if isinstance(given, MetadataInput) and given.key.startswith("lightly.") and given.key not in LIGHTLY_METADATA:
            raise ValueError(f"{where}.key={given.key!r}: the lightly.* keys are {', '.join(LIGHTLY_METADATA)}")
        if isinstance(given, MetadataInput) and not given.key.startswith("lightly."):
            found = (sources.lightly_root / METADATA / "schema.json").exists()
            keys = [entry["path"] for entry in read_metadata_schema(sources.lightly_root)] if found else []
            if given.key not in keys:
                raise ValueError(
                    f"{where}.key={given.key!r} is not in {sources.lightly_root}/.lightly/metadata/schema.json "
                    f"(its keys: {', '.join(keys) or 'none'}) nor a lightly.* key ({', '.join(LIGHTLY_METADATA)})"
                )


@dataclass(frozen=True)
class Resolved:
    """The form's strategies with their inputs, what could not be read, and the active-learning
    scores of the prediction tasks that SCORES inputs use (written out per sample)."""

    plan: list[Planned]
    problems: list[Problem]
    scores: dict[str, np.ndarray]


def resolve(
    form: SelectionForm, sources: InputSources, filenames: list[str], vectors: np.ndarray, tables: RunTables
) -> Resolved:
    """Resolve every strategy's input (see the module doc). Raises ValueError naming the strategy
    for an input that cannot be resolved at all (an unknown task, key or score)."""
    readers = Readers(sources, filenames, vectors, tables)
    plan = []
    for i, entry in enumerate(form.strategies):
        strategy = entry.strategy
        try:
            scored = readers.scored(entry.input, strategy.type)
        except ValueError as error:
            raise ValueError(f"selection_config.strategies[{i}]: {error}") from None
        options = strategy.model_dump(exclude={"type", "strength"})
        plan.append(Planned(strategy.type, getattr(strategy, "strength", 1.0), scored, options))
    return Resolved(plan, readers.problems, readers.scores)
