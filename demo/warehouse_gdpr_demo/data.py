"""Seeded, deterministic generator for the demo B2B CRM (schema ``crm``, demo/warehouse_gdpr_demo/sql/demo_crm.sql).

``seed(conn, contacts, seed, today)`` recreates the schema and fills it so that every rule of
include/policy.yaml has work to do. Same (contacts, seed, today) gives the same rows. Rows are made
``CHUNK`` contacts at a time and loaded with COPY, so memory stays bounded at 1M contacts.

All times are relative to ``today`` (00:00 UTC). "The 3-year line" is ``today`` minus 3 calendar
years (29 Feb -> 28 Feb, like PostgreSQL). Scenarios, by status:

- prospect / lead: ``recent`` (own interaction < 3 years), ``stale`` (> 3 years), ``rep_only_recent``
  (own interaction > 3 years, then a rep ``call_attempt`` about every 2 years up to < 3 years ago),
  ``never_old`` / ``never_new`` (no own interaction, created > / < 3 years ago), ``edge_interaction``
  and ``edge_created`` (last own interaction, or created_at when none, exactly on the 3-year line or
  one day either side, at 00:00 UTC: one day older must expire, one day newer must be kept);
- client: ``active`` (last contract with no end_date or an end_date in the future);
- former_client: last contract ended ``ended_recent`` (< 3 years), ``ended_old`` (3 to 9 years,
  so a final invoice younger than 10 years), ``ended_over_10y`` (no invoice younger than 10 years),
  ``edge_end`` (exactly the 3-year line -1, 0 or +1 day).

The first contacts walk through every (status, scenario, edge offset) once, so even a tiny demo
covers every case; the rest are drawn at random. About 1% of contacts carry ``litigation_hold``
and 2% ``do_not_contact``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal
from itertools import accumulate
from typing import TypeVar

import psycopg
from psycopg import sql

from . import safety
from .sqlfiles import read_sql

T = TypeVar("T")

CHUNK = 50_000
DAY = 86_400
# The columns written, with their types for binary COPY (which costs the client 5x less CPU than text).
COLUMNS = {
    "companies": "company_id int8, name text, industry text, employees int4, country text, created_at timestamptz",
    "contacts": "contact_id int8, company_id int8, status text, email text, first_name text, last_name text, "
    "direct_phone text, job_title text, created_at timestamptz, do_not_contact bool, litigation_hold bool",
    "activities": "activity_id int8, contact_id int8, kind text, occurred_at timestamptz, subject_line text",
    "notes": "note_id int8, contact_id int8, author text, body text, created_at timestamptz",
    "contracts": "contract_id int8, contact_id int8, start_date date, end_date date, value_eur numeric",
    "invoices": "invoice_id int8, contact_id int8, issued_on date, amount_eur numeric, billing_name text",
    "support_tickets": "ticket_id int8, contact_id int8, requester_email text, subject text, body text, "
    "created_at timestamptz",
}
# Subject-initiated kinds restart the retention clock; rep-initiated kinds do not (include/policy.yaml).
OWN_KINDS = (
    "email_open", "link_click", "email_reply", "web_visit", "event_attended", "content_download", "form_submit",
)
REP_KINDS = ("call_attempt", "email_sent", "note_added")

FIRST_NAMES = (
    "Hélène", "François", "Zoé", "Jérôme", "Chloé", "Gaëlle", "Noël", "Loïc", "Anaïs", "Frédéric", "Céline",
    "Sébastien", "Marie", "Pierre", "Camille", "Thomas", "Julie", "Nicolas", "Sophie", "Antoine", "Laura",
    "Hugo", "Emma", "Lucas", "Inès", "Mathieu", "Sarah", "Karim", "Fatima", "Yann", "Claire", "David", "Anna",
    "Jan", "Lena", "Jonas", "Lucía", "Javier", "Giulia", "Marco", "Elif", "Mehdi", "Aurélie", "Rémi", "Margaux",
    "Raphaël",
)
LAST_NAMES = (
    "Dupont", "Martin", "Bernard", "Lefèvre", "Moreau", "Girard", "Mercier", "Bonnet", "Fournier", "Lambert",
    "Fontaine", "Rousseau", "Vincent", "Muller", "Dubois", "Leroy", "Roux", "Faure", "André", "Bérenger", "Gauthier",
    "Perrin", "Chevalier", "Benoît", "Garnier", "Schmitt", "Peeters", "Janssens", "Weber", "García", "Rossi",
    "Nguyen", "Benali", "Haddad", "Kowalski", "Novák", "Brunet", "Deschênes", "Lefebvre", "Michaud",
)
JOB_TITLES = (
    "CTO", "DSI", "CEO", "CFO", "COO", "RevOps Manager", "VP Sales", "Head of Marketing", "Sales Ops Analyst",
    "Responsable Achats", "Directeur Commercial", "Data Protection Officer", "IT Manager", "Office Manager",
    "Head of Data", "Chef de projet", "Supply Chain Manager", "Account Executive", "Directrice Financière",
)
COMPANY_WORDS = (
    "Acme", "Nova", "Atlas", "Boréal", "Cobalt", "Delta", "Élan", "Fjord", "Granit", "Helix", "Iris", "Jade",
    "Kéops", "Lumen", "Mistral", "Nordik", "Orion", "Pixel", "Quartz", "Rivage", "Sirius", "Tellus", "Vega", "Zenith",
)
COMPANY_SUFFIXES = (
    "Logistique", "Industries", "Conseil", "Systèmes", "Énergie", "Santé", "Software", "Retail", "Transports",
    "Bâtiment", "Analytics", "Agro", "Finance", "Médias", "Robotics", "Services",
)
INDUSTRIES = ("logistics", "manufacturing", "consulting", "software", "energy", "healthcare", "retail", "finance")
COUNTRIES = (("FR", "+33"), ("FR", "+33"), ("FR", "+33"), ("BE", "+32"), ("CH", "+41"), ("LU", "+352"),
             ("DE", "+49"), ("ES", "+34"))
REPS = ("Claire Martin", "Julien Robert", "Nadia Belkacem", "Olivier Petit", "Sandrine Morel", "Tom Becker")
EMAILS = ("{first}, a quick question about {company}", "Proposal for {company}", "Invitation: GDPR-ready CRM webinar",
          "{first}, your 2025 logistics benchmark", "Following up on our call", "Pricing for {company}")
SUBJECTS = {
    "email_sent": EMAILS, "email_open": EMAILS, "link_click": EMAILS,
    "email_reply": tuple("Re: " + s for s in EMAILS),
    "web_visit": ("Visited /pricing", "Visited /blog/revops-playbook", "Visited /customers", "Visited /demo"),
    "event_attended": ("Webinar: data quality in B2B sales", "Salon VivaTech, booth B12", "User day Lyon"),
    "content_download": ("Downloaded: RevOps benchmark (PDF)", "Downloaded: GDPR checklist", "Downloaded: case study"),
    "form_submit": ("Contact form: {first} {last} requested a callback", "Demo request from {first} {last}"),
    "call_attempt": ("Call to {first}: no answer", "Call to {first}: left voicemail", "Call to {first}: wrong number"),
    "note_added": ("Note added on {first} {last}",),
}
NOTE_BODIES = (
    "Called {first} about the renewal, call back next week.", "{first} asked for a demo of the reporting module.",
    "Met {first} {last} at the trade show, interested in pricing.", "Left a voicemail for {first} on {phone}.",
    "{first} is changing roles at {company}; ask for the new contact.", "{first} said budget is frozen until Q3.",
    "{first} {last} prefers email; do not call before 10am.", "Sent {first} the contract draft for review.",
)
STATUSES = (("prospect", 40), ("lead", 25), ("client", 20), ("former_client", 15))
SCENARIOS = {
    "prospect": (("recent", 38), ("stale", 40), ("rep_only_recent", 10), ("never_old", 6), ("never_new", 3),
                 ("edge_interaction", 2), ("edge_created", 1)),
    "client": (("active", 1),),
    "former_client": (("ended_old", 50), ("ended_recent", 37), ("ended_over_10y", 10), ("edge_end", 3)),
}
SCENARIOS["lead"] = SCENARIOS["prospect"]
# Every (status, scenario, edge offset in days) once, for the first contacts.
COVERAGE = tuple(
    (status, name, offset)
    for status, _ in STATUSES
    for name, _ in SCENARIOS[status]
    for offset in ((1, 0, -1) if name.startswith("edge") else (0,))
)


def _slug(text: str, sep: str = "") -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return sep.join("".join(ch if ch.isalnum() else " " for ch in ascii_text).split())


def years_before(day: dt.date, years: int) -> dt.date:
    """``day`` minus whole calendar years; 29 February becomes 28 February (as in PostgreSQL)."""
    try:
        return day.replace(year=day.year - years)
    except ValueError:
        return day.replace(year=day.year - years, day=28)


class _Generator:
    """Draws rows from one random stream; buffers one chunk of rows per table."""

    def __init__(self, rng: random.Random, today: dt.date, companies: int) -> None:
        self.random = rng.random
        self.today = today
        self.midnight = dt.datetime(today.year, today.month, today.day, tzinfo=dt.timezone.utc)
        self.line = (today - years_before(today, 3)).days  # the 3-year line, in days before today
        self.ten_years = (today - years_before(today, 10)).days
        self.rows: dict[str, list[tuple]] = {table: [] for table in COLUMNS}
        self.counts = dict.fromkeys(COLUMNS, 0)
        self.companies: list[tuple[str, str, str]] = []  # (name, email domain, phone prefix) per company_id - 1
        self.slugs = {name: _slug(name) for name in FIRST_NAMES + LAST_NAMES}
        for company_id in range(1, companies + 1):
            name = f"{self.pick(COMPANY_WORDS)} {self.pick(COMPANY_SUFFIXES)}"
            country, prefix = self.pick(COUNTRIES)
            self.companies.append((name, _slug(name, "-") + ".example", prefix))
            self.add("companies", (company_id, name, self.pick(INDUSTRIES), self.between(5, 5000), country,
                                   self.at(self.between(DAY, 12 * 365 * DAY))))

    # rng.choice / rng.randrange cost three times as much and dominate the run time.
    def pick(self, items: Sequence[T]) -> T:
        return items[int(self.random() * len(items))]

    def between(self, low: int, high: int) -> int:
        """A random integer with low <= n < high."""
        return low + int(self.random() * (high - low))

    def at(self, age: int) -> dt.datetime:
        """The instant ``age`` seconds before today 00:00 UTC."""
        return self.midnight - dt.timedelta(seconds=age)

    def on(self, age_days: int) -> dt.date:
        return self.today - dt.timedelta(days=age_days)

    def add(self, table: str, row: tuple) -> None:
        self.counts[table] += 1
        self.rows[table].append(row)

    def flush(self, conn: psycopg.Connection) -> None:
        with conn.cursor() as cur:
            for table, rows in self.rows.items():
                if rows:
                    names, types = zip(*(column.split() for column in COLUMNS[table].split(", ")), strict=True)
                    with cur.copy(f"COPY crm.{table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.set_types(types)
                        for row in rows:
                            copy.write_row(row)
                    rows.clear()

    def contact(self, contact_id: int, status: str, scenario: str, edge: int) -> None:
        pick, random_ = self.pick, self.random
        company_id = self.between(1, len(self.companies) + 1)
        company, domain, prefix = self.companies[company_id - 1]
        first, last = pick(FIRST_NAMES), pick(LAST_NAMES)
        digits = f"{self.between(0, 10**8):08d}"
        phone = f"{prefix} {pick('67')} {digits[0:2]} {digits[2:4]} {digits[4:6]} {digits[6:8]}"
        names = {"first": first, "last": last, "company": company, "phone": phone}
        if status in ("prospect", "lead"):
            created, own, rep, latest = self.pipeline_timeline(scenario, edge)
        else:
            created, own, rep, latest = self.customer_timeline(contact_id, status, scenario, edge, f"{first} {last}")
        email = f"{self.slugs[first]}.{self.slugs[last]}.{contact_id}@{domain}"
        self.add("contacts", (
            contact_id, company_id, status, email,
            first, last, phone if random_() < 0.8 else None, pick(JOB_TITLES) if random_() < 0.95 else None,
            self.at(created), random_() < 0.02, random_() < 0.01,
        ))
        events = [(age, pick(OWN_KINDS)) for age in own] + [(age, pick(REP_KINDS)) for age in rep]
        events.sort(reverse=True)  # oldest first, so activity ids follow time
        for age, kind in events:
            subject = pick(SUBJECTS[kind]).format(**names) if random_() < 0.9 else None
            self.add("activities", (self.counts["activities"] + 1, contact_id, kind, self.at(age), subject))
        draw = random_()
        for _ in range(0 if draw < 0.6 else 1 if draw < 0.9 else 2):
            body = pick(NOTE_BODIES).format(**names)
            self.add("notes", (self.counts["notes"] + 1, contact_id, pick(REPS), body,
                               self.at(self.between(latest, created))))
        if status in ("client", "former_client") and random_() < 0.3:
            # Support desk tickets carry the requester's email; a quarter were never linked to the
            # contact (sent before the account existed): only the email finds them.
            linked = contact_id if random_() < 0.75 else None
            self.add("support_tickets", (
                self.counts["support_tickets"] + 1, linked, email, "Question about my invoice",
                f"Hello, {first} here. Could you resend the last invoice?", self.at(self.between(latest, created)),
            ))

    def pipeline_timeline(self, scenario: str, edge: int) -> tuple[int, list[int], list[int], int]:
        """Prospect or lead: (created_at age, own activity ages, rep activity ages, newest age), in seconds."""
        between, line, edge_age = self.between, self.line * DAY, (self.line + edge) * DAY
        if scenario in ("never_old", "never_new", "edge_created"):
            created = between(*{"never_old": (line + 2 * DAY, 3650 * DAY), "never_new": (2 * DAY, line - 2 * DAY),
                                "edge_created": (edge_age, edge_age + 1)}[scenario])
            rep = [] if scenario == "edge_created" else [between(0, created) for _ in range(between(0, 4))]
            return created, [], rep, min(rep, default=created - 1)
        last_own = between(*{"recent": (DAY, line - 2 * DAY), "stale": (line + 2 * DAY, 3450 * DAY),
                             "rep_only_recent": (line + 30 * DAY, 3000 * DAY),
                             "edge_interaction": (edge_age, edge_age + 1)}[scenario])
        created = last_own + between(DAY, max(2 * DAY, min(730 * DAY, 3650 * DAY - last_own)))
        own = [last_own] + [between(last_own + 1, created) for _ in range(between(0, 6))]
        rep = [between(last_own, created) for _ in range(between(0, 4))]
        latest = last_own
        if scenario == "rep_only_recent":  # the rep keeps calling about every two years; no answer
            call = last_own - between(700 * DAY, 760 * DAY)
            while call > 0:
                rep.append(call)
                latest, call = call, call - between(700 * DAY, 760 * DAY)
        return created, own, rep, latest

    def customer_timeline(self, contact_id: int, status: str, scenario: str, edge: int,
                          full_name: str) -> tuple[int, list[int], list[int], int]:
        """Client or former client: writes 1-3 contracts and their invoices; returns as `pipeline_timeline`.

        Contract and invoice ages are in days; the newest contract comes first.
        """
        between, random_ = self.between, self.random
        if status == "client":
            start = between(30, 4 * 365)
            end = None if random_() < 0.5 else -between(1, 730)  # no end, or ends in the future
        else:
            end = between(*{"ended_recent": (30, self.line - 1), "ended_old": (self.line + 2, 9 * 365),
                            "ended_over_10y": (self.ten_years + 2, self.ten_years + 300),
                            "edge_end": (self.line + edge, self.line + edge + 1)}[scenario])
            start = end + between(365, max(366, min(1096, 3550 - end)))
        relationship_end = max(end or 0, 0)
        for n in range(self.pick((1, 1, 2, 3))):
            if n:  # an earlier contract, ended before the next one started, if it fits in ten years
                earlier_end = start + between(1, 91)
                if earlier_end + 365 > 3550:
                    break
                end, start = earlier_end, earlier_end + between(365, min(1096, 3551 - earlier_end))
            value = between(300_000, 15_000_000)  # cents
            self.add("contracts", (self.counts["contracts"] + 1, contact_id, self.on(start),
                                   None if end is None else self.on(end), Decimal(value).scaleb(-2)))
            period_end = max(end or 0, 0)
            issued = [between(period_end, start + 1) for _ in range(between(1, 4))]
            if end is not None and end >= 0:
                issued.append(end)  # the final invoice, on the end date
            amount = Decimal(value // len(issued)).scaleb(-2)
            for age in sorted(issued, reverse=True):
                self.add("invoices", (self.counts["invoices"] + 1, contact_id, self.on(age), amount, full_name))
        created = (start + between(14, 121)) * DAY
        low = relationship_end * DAY
        own = [between(low, created) for _ in range(between(2, 8))]
        rep = [between(low, created) for _ in range(between(0, 4))]
        return created, own, rep, low


def _picker(weighted: tuple[tuple[str, int], ...]) -> Callable[[random.Random], str]:
    names, cum_weights = [name for name, _ in weighted], list(accumulate(weight for _, weight in weighted))
    return lambda rng: rng.choices(names, cum_weights=cum_weights)[0]


PICK_STATUS = _picker(STATUSES)
PICK_SCENARIO = {status: _picker(weighted) for status, weighted in SCENARIOS.items()}


def seed(conn: psycopg.Connection, contacts: int = 10_000, seed: int = 42,
         today: dt.date | None = None) -> dict[str, int]:
    """Recreate schema ``crm`` and fill it with ``contacts`` demo contacts; commit, ANALYZE.

    Deterministic for the same (contacts, seed, today); ``today`` defaults to ``date.today()`` and
    every date is relative to it. Returns the number of rows written per table (companies, contacts,
    activities, notes, contracts, invoices).
    """
    if contacts < 1:
        raise ValueError(f"contacts must be at least 1, got {contacts}")
    safety.check_demo_target(conn)  # never drops a schema the demo did not create
    rng = random.Random(seed)
    gen = _Generator(rng, today or dt.date.today(), max(1, contacts // 8))
    with conn.transaction():
        safety.mark(conn)
        conn.execute(read_sql("demo_crm.sql"))
        # Foreign keys are dropped during the load and put back after it (from the catalog's own
        # definitions): one check per row costs more than generating the row, one join at the end little.
        foreign_keys = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE contype = 'f' AND connamespace = 'crm'::regnamespace ORDER BY 1, 2"
        ).fetchall()
        for table, name, _ in foreign_keys:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(table), sql.Identifier(name)))
        gen.flush(conn)
        for contact_id in range(1, contacts + 1):
            if contact_id <= len(COVERAGE):
                status, scenario, edge = COVERAGE[contact_id - 1]
            else:
                status = PICK_STATUS(rng)
                scenario, edge = PICK_SCENARIO[status](rng), rng.choice((1, 0, -1))
            gen.contact(contact_id, status, scenario, edge)
            if contact_id % CHUNK == 0:
                gen.flush(conn)
        gen.flush(conn)
        for table, name, definition in foreign_keys:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(table), sql.Identifier(name), sql.SQL(definition)))
    conn.commit()
    conn.execute("ANALYZE " + ", ".join(f"crm.{table}" for table in COLUMNS))
    conn.commit()
    return dict(gen.counts)


def main(argv: list[str] | None = None) -> None:
    """``python -m warehouse_gdpr_demo.data --url URL --contacts N --seed S [--today YYYY-MM-DD]``."""
    parser = argparse.ArgumentParser(description="Seed the demo CRM (schema crm) with deterministic data.")
    parser.add_argument("--url", required=True, help="PostgreSQL URL, e.g. postgresql://user@host/db")
    parser.add_argument("--contacts", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--today", type=dt.date.fromisoformat, default=None, help="default: today's date")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with psycopg.connect(args.url) as conn:
        counts = seed(conn, contacts=args.contacts, seed=args.seed, today=args.today)
    for table, count in counts.items():
        print(f"{table:<11} {count:>10,}")
    print(f"seeded in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
