"""The reference's fixtures that the lab's tests use too, imported from test_all.py (the lab imports
the root, never the reverse)."""
from test_all import finished_run  # noqa: F401  (a pytest fixture: pytest finds it by name)
