-- Demo only: the support desk's own database (a downstream system reached as a SQL target).
DROP SCHEMA IF EXISTS desk CASCADE;
CREATE SCHEMA desk;
CREATE TABLE desk.tickets (
    ticket_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requester_email text NOT NULL,
    subject         text NOT NULL,
    opened_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_requester_idx ON desk.tickets (lower(requester_email));
CREATE TABLE desk.ticket_messages (
    message_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticket_id   bigint NOT NULL REFERENCES desk.tickets (ticket_id),
    body        text NOT NULL
);
CREATE INDEX ticket_messages_ticket_idx ON desk.ticket_messages (ticket_id);
