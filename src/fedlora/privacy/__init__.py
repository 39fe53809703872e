"""Formal privacy (``[privacy]``): secure aggregation (``secagg``, with ``shamir`` and
``fixed_point``; the engine's side in ``secure_round``)."""
