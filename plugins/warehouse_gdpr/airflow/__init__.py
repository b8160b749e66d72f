"""The Airflow layer: connections, keys and the run's policy (connections.py), failures mapped to
fail-now or retry and warehouse errors scrubbed (errors.py), task bodies (tasks/), the DAG factory
(dag_factory.py). The only place that imports Airflow; the engine is called from here."""
