import gc

from tasks.imports import frozen_imports


def test_imports_run_without_the_collector_and_what_they_made_is_frozen_after():
    try:
        with frozen_imports():
            assert not gc.isenabled()
            module_state = {"table": [1, 2, 3]}  # what an import leaves: tracked containers
        assert gc.isenabled()
        assert not any(tracked is module_state for tracked in gc.get_objects())  # frozen: no pass walks it
    finally:
        gc.unfreeze()  # this process's objects go back to the collector
