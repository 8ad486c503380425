"""The trainer and what it needs at run time: arguments, checkpoints, launching, the non-finite guard, streams."""
