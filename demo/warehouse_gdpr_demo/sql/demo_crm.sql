-- Demo B2B CRM schema `crm`. Used by the demo, the tests and the benchmark.
-- Real deployments map their own tables in policy.yaml instead.
-- Idempotent: safe to run on an existing demo warehouse (it drops and recreates `crm`).

DROP SCHEMA IF EXISTS crm CASCADE;
CREATE SCHEMA crm;

CREATE TABLE crm.companies (
    company_id   bigint PRIMARY KEY,
    name         text NOT NULL,
    industry     text NOT NULL,
    employees    integer NOT NULL,
    country      text NOT NULL,
    created_at   timestamptz NOT NULL
);

CREATE TABLE crm.contacts (
    contact_id       bigint PRIMARY KEY,
    company_id       bigint NOT NULL REFERENCES crm.companies (company_id),
    status           text NOT NULL CHECK (status IN ('prospect', 'lead', 'client', 'former_client')),
    email            text NOT NULL,
    first_name       text,
    last_name        text,
    direct_phone     text,
    job_title        text,
    created_at       timestamptz NOT NULL,
    do_not_contact   boolean NOT NULL DEFAULT false,
    litigation_hold  boolean NOT NULL DEFAULT false,
    pseudonymised_at timestamptz
);
CREATE INDEX contacts_email_idx ON crm.contacts (lower(btrim(email)));
CREATE INDEX contacts_status_idx ON crm.contacts (status, contact_id);

CREATE TABLE crm.activities (
    activity_id  bigint PRIMARY KEY,
    contact_id   bigint NOT NULL REFERENCES crm.contacts (contact_id),
    kind         text NOT NULL CHECK (kind IN (
                     'email_open', 'link_click', 'email_reply', 'web_visit', 'event_attended',
                     'content_download', 'form_submit',
                     'call_attempt', 'email_sent', 'note_added', 'unsubscribe')),
    occurred_at  timestamptz NOT NULL,
    subject_line text
);
CREATE INDEX activities_contact_kind_idx ON crm.activities (contact_id, kind, occurred_at);

CREATE TABLE crm.notes (
    note_id     bigint PRIMARY KEY,
    contact_id  bigint NOT NULL REFERENCES crm.contacts (contact_id),
    author      text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX notes_contact_idx ON crm.notes (contact_id);

CREATE TABLE crm.contracts (
    contract_id  bigint PRIMARY KEY,
    contact_id   bigint NOT NULL REFERENCES crm.contacts (contact_id),
    start_date   date NOT NULL,
    end_date     date,
    value_eur    numeric(12, 2) NOT NULL
);
CREATE INDEX contracts_contact_idx ON crm.contracts (contact_id, end_date);

CREATE TABLE crm.invoices (
    invoice_id   bigint PRIMARY KEY,
    contact_id   bigint NOT NULL REFERENCES crm.contacts (contact_id),
    issued_on    date NOT NULL,
    amount_eur   numeric(12, 2) NOT NULL,
    billing_name text
);
CREATE INDEX invoices_contact_idx ON crm.invoices (contact_id, issued_on);

CREATE TABLE crm.support_tickets (
    ticket_id       bigint PRIMARY KEY,
    contact_id      bigint REFERENCES crm.contacts (contact_id),
    requester_email text NOT NULL,
    subject         text,
    body            text,
    created_at      timestamptz NOT NULL
);
CREATE INDEX support_tickets_contact_idx ON crm.support_tickets (contact_id);
CREATE INDEX support_tickets_email_idx ON crm.support_tickets (lower(btrim(requester_email)));
