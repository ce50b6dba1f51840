"""What the queue keeps in Redis, shared by every process that reads or writes it.

Both sides use these: the front ends (`imagegen add`, `status`, the web API) and the worker. Every Redis key
(`keys`), the connection (`connections`), queueing prompts (`enqueue`, `priority`), the pause and the failure
streak (`state`), what a worker's heartbeat says (`beats`), the per-prompt lease (`lease`), remembered
generations (`ledger`), the cap and the daily limits on paid calls (`permits`, `spend`), the jimeng account
pool (`accounts`), a job's stages (`stages`), outcomes per minute (`throughput`) and record states for a
collection without a status field (`marks`). Nothing here calls PocketBase, a provider or the bucket.
"""
