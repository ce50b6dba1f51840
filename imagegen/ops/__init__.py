"""What an operator does, shared by every front end: the CLI, the web API and the worker's own sweeps.

Queueing, inspecting, pausing and the queue's status (`control`), tasks listed by state (`listing`), records
by status (`record_states`), the checks of `imagegen check` (`checks`), `imagegen generate` (`oneoff`),
`imagegen setup-collection` (`collection_setup`) and the Prometheus metrics (`metrics`).
"""
