"""Ray Serve deployments for Pusa V1 and the plain-Python storage and job records they share."""
