-- One point-of-sale checkout, as a till does it: look the item up, record the sale and its
-- line, take the item out of the store's stock, all in one transaction.
--
-- Run with -M extended (or prepared with -j equal to -c): the :variables become bind
-- parameters.  In -M simple they would be pasted into the SQL unquoted and :item_sku (text)
-- would break.  Tables and rows come from bench/run.py (1000 products, stores 1..10).
\set item random(1, 1000)
\set store random(1, 10)
\set qty random(1, 5)
BEGIN;
SELECT sku AS item_sku, price_cents AS price FROM products WHERE sku = lpad(CAST(:item AS text), 13, '0') \gset
\set total :price * :qty
INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('store-' || lpad(CAST(:store AS text), 3, '0'), 'bench-till', :total) RETURNING id AS sale_id \gset
INSERT INTO sale_items (sale_id, sku, quantity, price_cents) VALUES (:sale_id, :item_sku, :qty, :price);
UPDATE stock SET quantity = quantity - :qty WHERE store_id = 'store-' || lpad(CAST(:store AS text), 3, '0') AND sku = :item_sku;
COMMIT;
