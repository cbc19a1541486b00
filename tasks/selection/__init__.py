"""Stage 6, selection: `backends` (NumPy, CuPy, torch), `kcenter` (the algorithms, pure) and `tasks`
(the selection table, the Prefect tasks)."""
