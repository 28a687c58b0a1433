"""Ray Serve mode (the ``cluster`` extra): the same FastAPI service as an ingress deployment, the models in a
model deployment. Nothing outside this package imports Ray; ``segment serve`` without ``--ray`` never loads it."""
