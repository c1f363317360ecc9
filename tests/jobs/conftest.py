# The private PostgreSQL cluster that outage tests stop and start (tests/pgcluster.py).
from tests.pgcluster import pg_cluster  # noqa: F401
