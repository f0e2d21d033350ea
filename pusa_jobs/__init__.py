"""The job system, shared by the Serve app (`deployments`) and the batch (`pusa_batch`): the database and
its migrations, jobs with their events and leases, API keys, quotas and cost, webhooks, files and batches,
the blob store, a submission's fields, metrics and job logging. It imports neither `deployments` nor
`pusa_batch`."""
