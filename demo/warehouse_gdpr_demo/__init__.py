"""The demo of warehouse-gdpr: a seeded CRM, downstream services, the compose seed and an embedded
PostgreSQL. Its own package, never in the wheel; tests and the compose stack use it.

  run.py           `make demo` (python -m warehouse_gdpr_demo): seed, sweep, erase, opt-out sync
  data.py          the seeded demo CRM generator
  services.py      the demo's downstream HTTP services (Brevo-like emailing, telephony)
  compose_seed.py  the compose stack's warehouse-init
  embedded.py      the embedded PostgreSQL used by the demo, the tests and the benchmark
  sql/             the demo CRM, support desk and grants (demo data only)
"""
