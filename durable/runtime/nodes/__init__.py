"""One module per node kind; each decides a run's transition from its state and returns it.

A node module imports only definitions, the context and transition data: it reads through
the `Visit` it is given, runs the user's callables through `Visit.call`, and never writes
run state.
"""
