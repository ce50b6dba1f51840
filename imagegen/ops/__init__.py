"""What an operator does, shared by every front end: the CLI, the web API and the worker's own sweeps.

Queueing, inspecting, pausing and the queue's status (`control`), tasks listed by state (`listing`), records
by status (`record_states`) and their counts shared between viewers (`record_counts`), the checks of
`imagegen check` (`checks`), `imagegen generate` (`oneoff`), `imagegen setup-collection` (`collection_setup`),
the accounts with their credits (`accounts_report`), the Prometheus metrics (`metrics`) and one model per
answer of the API and of `--json` (`answers`).
"""
