"""Task bodies of the DAGs: sweep.py (gdpr_retention_sweep), erasure.py (gdpr_subject_erasure and
gdpr_erasure_retry), optout.py (gdpr_optout_sync). Each validates, calls the engine, logs counts only."""
