"""Formal privacy for federated fine-tuning (``[privacy]``).

- ``dp_sgd``: differentially private local training (per-example clipping and Gaussian noise in
  every local step; ``dp_sgd``), example-level (ε, δ) per client.
- ``central``: user-level DP at the server (clipped client updates, a noised uniform mean,
  optional adaptive clipping; ``central``).
- ``accounting``: (ε, δ) of repeated sampled Gaussian steps with dp-accounting's RDP accountant;
  ``plan`` resolves a config into the numbers (noise multiplier solved from a target ε, δ);
  ``budget`` tracks what each party has spent per round and stops a run at ``max_epsilon``;
  ``refusals`` says at config time what cannot be combined with a mechanism, and why.
- ``secagg``: secure aggregation (Bonawitz et al. 2017, with ``shamir`` and ``fixed_point``; the
  engine's side in ``secure_round``): the server learns only the sum of the replies.
"""
