-- The demo's small POS schema: what a till needs to sell and a manager to report.
CREATE TABLE products (
    sku         text PRIMARY KEY,
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0)
);

CREATE TABLE stock (
    store_id text NOT NULL,
    sku      text NOT NULL REFERENCES products (sku),
    quantity integer NOT NULL,
    PRIMARY KEY (store_id, sku)
);

CREATE TABLE sales (
    id          bigserial PRIMARY KEY,
    store_id    text NOT NULL,
    terminal_id text NOT NULL,
    total_cents integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sale_items (
    sale_id     bigint NOT NULL REFERENCES sales (id),
    sku         text NOT NULL REFERENCES products (sku),
    quantity    integer NOT NULL CHECK (quantity > 0),
    price_cents integer NOT NULL,
    PRIMARY KEY (sale_id, sku)
);

INSERT INTO products (sku, name, price_cents) VALUES
    ('4006381333931', 'Ballpoint pen, blue', 129),
    ('5000159484695', 'Chocolate bar 50 g', 99),
    ('8710398500120', 'Coffee beans 500 g', 899),
    ('4311501012345', 'Sparkling water 1 l', 59),
    ('9780201379624', 'Notebook A5', 349);

INSERT INTO stock (store_id, sku, quantity)
SELECT store_id, sku, 100
FROM products CROSS JOIN (VALUES ('store-001'), ('store-002')) AS stores (store_id);
