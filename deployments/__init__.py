"""Ray Serve deployments for Pusa V1 (the stages, the Router, the Runner) and the HTTP layer; the job system
they use is `pusa_jobs`."""
