"""The Airflow layer: connections and keys (connections.py), task bodies (tasks/), the DAG factory
(dag_factory.py). The only place that imports Airflow; the engine is called from here."""
