"""The chaos soak: worker processes killed, connections terminated and PostgreSQL restarted
while runs of workflows that use every node type go through; a checker proves nothing was
lost or done twice. `python -m tests.soak.chaos --runs 2000` (or `make soak`)."""
