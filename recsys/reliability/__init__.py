"""Reliability helpers of the training and scoring jobs (see ``docs/reliability.md``).

* :mod:`~recsys.reliability.rng`: capture / restore every RNG that can affect training;
* :mod:`~recsys.reliability.guards`: skip-and-count guard against non-finite losses and gradients;
* :mod:`~recsys.reliability.faults`: opt-in crash points for the kill tests (inert by default);
* :mod:`~recsys.reliability.resume`: trimming a run's log back to the checkpoint it resumes from.
"""
