"""The workflow runtime: how a worker moves a run, decided by node kind and applied in SQL.

`runner` claims a job and reads the run; a module of `nodes` decides the transition (pure
but for reads and the user's callables, which it runs through `attempt`); `apply` is the
only writer of run state. `compensation` walks the undo steps, `lease` runs
`transactional=False` steps outside any transaction.
"""
