import java.io.FileReader;
import java.io.Reader;
import java.math.BigDecimal;
import java.sql.Array;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeSet;
import org.postgresql.PGConnection;
import org.postgresql.PGStatement;

/**
 * A point-of-sale till's JDBC session, run by tests/integration/test_jdbc.py against PostgreSQL
 * directly and through the proxy (whose outputs must be equal) and recorded for the fuzzer
 * (tests/fuzz/capture.py).
 *
 * <p>Usage: {@code PosTill [--temp] MAIN.properties [RESTRICTED.properties]}. Each properties file
 * holds {@code url} and pgjdbc's connection properties. MAIN runs a sale with prepared statements
 * (past pgjdbc's prepareThreshold, so they become server-side statements), batches, rollbacks, a
 * time zone change, typed values and schema changes between executions of one statement;
 * RESTRICTED is a login that may read jdbc_products only: its DELETE must fail with 42501 and its
 * connection stay usable. {@code --temp} makes the tables temporary (no RESTRICTED then). Every
 * result is printed as one JSON object per line; nothing printed depends on the connection's path
 * (no pid, no server address, no time of day).
 */
public final class PosTill {
  private static final String[] SKUS = {"4006381333931", "5000159484695", "8710398500120"};
  // More executions than pgjdbc's default prepareThreshold (5): the last ones are server-prepared.
  private static final int LINES_PER_SALE = 7;

  private PosTill() {}

  public static void main(String[] args) throws Exception {
    List<String> files = new ArrayList<>(Arrays.asList(args));
    boolean temporary = files.remove("--temp");
    if (files.isEmpty() || files.size() > 2 || (temporary && files.size() > 1)) {
      throw new IllegalArgumentException("usage: PosTill [--temp] MAIN.properties [RESTRICTED.properties]");
    }
    emit("driver", "version", org.postgresql.util.DriverInfo.DRIVER_VERSION);
    try (Connection till = connect(files.get(0))) {
      createTables(till, temporary);
      sales(till);
      batches(till);
      rollbacks(till);
      timeZone(till);
      typedValues(till);
      schemaChanges(till);
      if (files.size() == 2) {
        refusals(till, files.get(1));
      }
    }
  }

  private static Connection connect(String propertiesFile) throws Exception {
    Properties properties = new Properties();
    try (Reader reader = new FileReader(propertiesFile, java.nio.charset.StandardCharsets.UTF_8)) {
      properties.load(reader);
    }
    String url = (String) properties.remove("url");
    return DriverManager.getConnection(url, properties);
  }

  private static void createTables(Connection till, boolean temporary) throws SQLException {
    String create = temporary ? "CREATE TEMP TABLE " : "CREATE TABLE ";
    try (Statement statement = till.createStatement()) {
      if (!temporary) {
        // A new session has no temporary tables: a DROP here could only reach the permanent ones.
        statement.execute("DROP TABLE IF EXISTS jdbc_items, jdbc_sales, jdbc_products");
      }
      statement.execute(create + "jdbc_products (sku text PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL)");
      statement.execute(create + "jdbc_sales (id bigint PRIMARY KEY, till text NOT NULL, total numeric(10,2) NOT NULL, sold_at timestamptz NOT NULL)");
      statement.execute(create + "jdbc_items (sale_id bigint NOT NULL, line int NOT NULL, sku text NOT NULL, qty int NOT NULL, price numeric(10,2) NOT NULL, PRIMARY KEY (sale_id, line))");
      int products = statement.executeUpdate(
          "INSERT INTO jdbc_products VALUES ('4006381333931', 'Ballpoint pen, blue', 1.29),"
              + " ('5000159484695', 'Chocolate bar 50 g', 0.99), ('8710398500120', 'Caf\u00e9 beans 500 g', 8.99)");
      if (!temporary) {
        // Directly, the restricted login is an ordinary role that may read the price list only.
        statement.execute("GRANT SELECT ON jdbc_products TO PUBLIC");
      }
      emit("tables", "temporary", temporary, "products", products);
    }
  }

  private static boolean serverPrepared(PreparedStatement statement) throws SQLException {
    return statement.unwrap(PGStatement.class).isUseServerPrepare();
  }

  /** Two sales, each its own transaction: a price lookup and an item insert per line, then the sale. */
  private static void sales(Connection till) throws SQLException {
    till.setAutoCommit(false);
    try (PreparedStatement price = till.prepareStatement("SELECT name, price FROM jdbc_products WHERE sku = ?");
        PreparedStatement item = till.prepareStatement(
            "INSERT INTO jdbc_items (sale_id, line, sku, qty, price) VALUES (?, ?, ?, ?, ?)");
        PreparedStatement sale = till.prepareStatement(
            "INSERT INTO jdbc_sales (id, till, total, sold_at) VALUES (?, ?, ?, ?)")) {
      for (long saleId = 1; saleId <= 2; saleId++) {
        BigDecimal total = BigDecimal.ZERO;
        List<String> names = new ArrayList<>();
        for (int line = 1; line <= LINES_PER_SALE; line++) {
          String sku = SKUS[(line + (int) saleId) % SKUS.length];
          price.setString(1, sku);
          BigDecimal unit;
          try (ResultSet rows = price.executeQuery()) {
            rows.next();
            names.add(rows.getString(1));
            unit = rows.getBigDecimal(2);
          }
          item.setLong(1, saleId);
          item.setInt(2, line);
          item.setString(3, sku);
          item.setInt(4, line);
          item.setBigDecimal(5, unit);
          item.executeUpdate();
          total = total.add(unit.multiply(BigDecimal.valueOf(line)));
        }
        sale.setLong(1, saleId);
        sale.setString(2, "till-01");
        sale.setBigDecimal(3, total);
        sale.setObject(4, OffsetDateTime.of(2024, 5, 17, 12, 30, (int) saleId, 0, ZoneOffset.UTC));
        sale.executeUpdate();
        till.commit();
        emit("sale", "id", saleId, "total", total.toPlainString(), "names", names,
            "server_prepared", serverPrepared(price) && serverPrepared(item));
      }
    } finally {
      till.setAutoCommit(true);
    }
    try (Statement statement = till.createStatement();
        ResultSet rows = statement.executeQuery(
            "SELECT s.id, s.total, s.sold_at, count(i.*), sum(i.qty * i.price) FROM jdbc_sales s"
                + " JOIN jdbc_items i ON i.sale_id = s.id GROUP BY s.id ORDER BY s.id")) {
      while (rows.next()) {
        emit("sale_row", "id", rows.getLong(1), "total", rows.getBigDecimal(2).toPlainString(),
            "sold_at", rows.getObject(3, OffsetDateTime.class).toString(), "lines", rows.getLong(4),
            "sum", rows.getBigDecimal(5).toPlainString());
      }
    }
  }

  /** executeBatch of item inserts, twice (the second time on a server-prepared statement). */
  private static void batches(Connection till) throws SQLException {
    try (PreparedStatement item = till.prepareStatement(
        "INSERT INTO jdbc_items (sale_id, line, sku, qty, price) VALUES (?, ?, ?, ?, ?)")) {
      for (long saleId = 3; saleId <= 4; saleId++) {
        for (int line = 1; line <= 25; line++) {
          item.setLong(1, saleId);
          item.setInt(2, line);
          item.setString(3, SKUS[line % SKUS.length]);
          item.setInt(4, 1);
          item.setBigDecimal(5, new BigDecimal("0.99"));
          item.addBatch();
        }
        int[] counts = item.executeBatch();
        emit("batch", "sale", saleId, "statements", counts.length, "rows", Arrays.stream(counts).sum());
      }
    }
    try (Statement statement = till.createStatement();
        ResultSet rows = statement.executeQuery(
            "SELECT count(*), sum(qty * price) FROM jdbc_items WHERE sale_id IN (3, 4)")) {
      rows.next();
      emit("batch_rows", "count", rows.getLong(1), "sum", rows.getBigDecimal(2).toPlainString());
    }
  }

  private static long count(Connection connection, String sql) throws SQLException {
    try (Statement statement = connection.createStatement(); ResultSet rows = statement.executeQuery(sql)) {
      rows.next();
      return rows.getLong(1);
    }
  }

  private static void execute(Connection connection, String sql) throws SQLException {
    try (Statement statement = connection.createStatement()) {
      statement.execute(sql);
    }
  }

  private static String failure(Connection connection, String sql) {
    try (Statement statement = connection.createStatement()) {
      statement.execute(sql);
      return "none";
    } catch (SQLException error) {
      return error.getSQLState();
    }
  }

  /** A duplicate line rolled back to a savepoint, then the whole sale rolled back; and a failed one. */
  private static void rollbacks(Connection till) throws SQLException {
    String line = "INSERT INTO jdbc_items (sale_id, line, sku, qty, price) VALUES (5, 1, '%s', 1, 1.29)";
    till.setAutoCommit(false);
    try {
      execute(till, "INSERT INTO jdbc_sales VALUES (5, 'till-01', 1.29, now())");
      execute(till, String.format(line, SKUS[0]));
      Savepoint beforeDuplicate = till.setSavepoint("line_2");
      String duplicate = failure(till, String.format(line, SKUS[1]));
      till.rollback(beforeDuplicate);
      long inside = count(till, "SELECT count(*) FROM jdbc_items WHERE sale_id = 5");
      till.rollback();
      long after = count(till, "SELECT count(*) FROM jdbc_items WHERE sale_id = 5")
          + count(till, "SELECT count(*) FROM jdbc_sales WHERE id = 5");
      till.commit();
      emit("savepoint_rollback", "duplicate", duplicate, "lines_inside", inside, "left_after_rollback", after);
      String failed = failure(till, "SELECT 1 / 0");
      String next = failure(till, "SELECT 1");
      till.rollback();
      emit("failed_transaction", "error", failed, "next", next, "after_rollback", count(till, "SELECT 2"));
      till.commit();
    } finally {
      till.setAutoCommit(true);
    }
  }

  private static String text(Connection connection, String sql) throws SQLException {
    try (Statement statement = connection.createStatement(); ResultSet rows = statement.executeQuery(sql)) {
      rows.next();
      return rows.getString(1);
    }
  }

  /** SET TIME ZONE, then statements in later transactions (another server connection, pooled). */
  private static void timeZone(Connection till) throws SQLException {
    try (Statement statement = till.createStatement()) {
      statement.execute("SET TIME ZONE 'America/New_York'");
    }
    Map<String, String> reported = till.unwrap(PGConnection.class).getParameterStatuses();
    try (PreparedStatement soldAt = till.prepareStatement("SELECT sold_at::text FROM jdbc_sales WHERE id = ?")) {
      List<String> rendered = new ArrayList<>();
      for (int run = 0; run < 6; run++) {
        soldAt.setLong(1, 1 + run % 2);
        try (ResultSet rows = soldAt.executeQuery()) {
          rows.next();
          rendered.add(rows.getString(1));
        }
      }
      emit("time_zone", "reported", reported.get("TimeZone"), "show", text(till, "SHOW TimeZone"),
          "literal", text(till, "SELECT '2024-01-15 12:00:00+00'::timestamptz::text"),
          "sold_at", new ArrayList<>(new TreeSet<>(rendered)));
    }
  }

  /** Values of many types from one statement executed past the threshold (then binary, server-side). */
  private static void typedValues(Connection till) throws SQLException {
    String sql = "SELECT ?::int8 * 1000000000000, ?::numeric / 3, ?::float8 / 8, ?::int4 % 2 = 0,"
        + " decode('00ff10', 'hex'), 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, date '2024-02-29' + ?::int4,"
        + " ARRAY['kaffe', 'br\u00f6d', NULL], interval '1 day 02:03:04', '{\"sku\": 1}'::jsonb,"
        + " '2024-05-17 12:30:00.123456+00'::timestamptz, time '23:59:59.5', NULL::text";
    try (PreparedStatement values = till.prepareStatement(sql)) {
      for (int run = 1; run <= 7; run++) {
        for (int parameter = 1; parameter <= 5; parameter++) {
          values.setInt(parameter, run);
        }
        try (ResultSet rows = values.executeQuery()) {
          rows.next();
          ResultSetMetaData meta = rows.getMetaData();
          List<String> rendered = new ArrayList<>();
          List<String> types = new ArrayList<>();
          for (int column = 1; column <= meta.getColumnCount(); column++) {
            Object value = rows.getObject(column);
            if (value instanceof byte[]) {
              rendered.add(java.util.HexFormat.of().formatHex((byte[]) value));
            } else if (value instanceof Array) {
              rendered.add(Arrays.toString((Object[]) ((Array) value).getArray()));
            } else {
              rendered.add(value == null ? null : value.toString());
            }
            types.add(meta.getColumnTypeName(column));
          }
          emit("typed_values", "run", run, "values", rendered, "types", types,
              "server_prepared", serverPrepared(values));
        }
      }
    }
  }

  private static List<String> columns(PreparedStatement query, long saleId) throws SQLException {
    query.setLong(1, saleId);
    try (ResultSet rows = query.executeQuery()) {
      ResultSetMetaData meta = rows.getMetaData();
      List<String> columns = new ArrayList<>();
      for (int column = 1; column <= meta.getColumnCount(); column++) {
        columns.add(meta.getColumnName(column) + ":" + meta.getColumnTypeName(column));
      }
      rows.next();
      columns.add("first=" + rows.getString(meta.getColumnCount()));
      return columns;
    }
  }

  /**
   * SELECT * prepared on the server, then ALTER TABLE between executions: the server answers 0A000
   * "cached plan must not change result type" and pgjdbc prepares the statement again.
   */
  private static void schemaChanges(Connection till) throws SQLException {
    try (PreparedStatement query = till.prepareStatement("SELECT * FROM jdbc_items WHERE sale_id = ? ORDER BY line");
        Statement ddl = till.createStatement()) {
      List<String> before = null;
      for (int run = 0; run < 7; run++) {
        before = columns(query, 1 + run % 2);
      }
      emit("schema", "change", "none", "columns", before, "server_prepared", serverPrepared(query));
      ddl.execute("ALTER TABLE jdbc_items ADD COLUMN note text NOT NULL DEFAULT 'none'");
      emit("schema", "change", "add column", "columns", columns(query, 1));
      ddl.execute("ALTER TABLE jdbc_items ALTER COLUMN qty TYPE bigint");
      emit("schema", "change", "column type", "columns", columns(query, 2));
      List<String> later = null;
      for (int run = 0; run < 3; run++) {
        later = columns(query, 3 + run % 2);
      }
      emit("schema", "change", "none", "columns", later, "server_prepared", serverPrepared(query));
    }
  }

  /** The restricted login's DELETE fails (42501) each time and inside a transaction; it reads on. */
  private static void refusals(Connection till, String restrictedProperties) throws Exception {
    long sales = count(till, "SELECT count(*) FROM jdbc_sales");
    try (Connection clerk = connect(restrictedProperties);
        PreparedStatement delete = clerk.prepareStatement("DELETE FROM jdbc_sales WHERE id = ?")) {
      List<String> states = new ArrayList<>();
      for (int run = 0; run < 6; run++) {
        delete.setLong(1, 1);
        try {
          delete.executeUpdate();
          states.add("none");
        } catch (SQLException error) {
          states.add(error.getSQLState());
        }
      }
      long products = count(clerk, "SELECT count(*) FROM jdbc_products");
      clerk.setAutoCommit(false);
      long inTransaction = count(clerk, "SELECT count(*) FROM jdbc_products");
      String refused = failure(clerk, "DELETE FROM jdbc_sales WHERE id = 2");
      String next = failure(clerk, "SELECT count(*) FROM jdbc_products");
      clerk.rollback();
      long afterRollback = count(clerk, "SELECT count(*) FROM jdbc_products");
      clerk.commit();
      emit("refused", "states", states, "products", products, "in_transaction", inTransaction,
          "refused_in_transaction", refused, "next", next, "after_rollback", afterRollback,
          "sales_before", sales, "sales_after", count(till, "SELECT count(*) FROM jdbc_sales"));
    }
  }

  // --- JSON lines (no library on the classpath but pgjdbc) ---

  private static void emit(String step, Object... pairs) {
    StringBuilder line = new StringBuilder("{\"step\": ");
    quote(line, step);
    for (int at = 0; at < pairs.length; at += 2) {
      line.append(", ");
      quote(line, (String) pairs[at]);
      line.append(": ");
      value(line, pairs[at + 1]);
    }
    System.out.println(line.append('}'));
  }

  private static void value(StringBuilder out, Object value) {
    if (value == null) {
      out.append("null");
    } else if (value instanceof Number || value instanceof Boolean) {
      out.append(value);
    } else if (value instanceof List) {
      out.append('[');
      String separator = "";
      for (Object item : (List<?>) value) {
        out.append(separator);
        value(out, item);
        separator = ", ";
      }
      out.append(']');
    } else {
      quote(out, value.toString());
    }
  }

  private static void quote(StringBuilder out, String text) {
    out.append('"');
    for (char c : text.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    out.append('"');
  }
}
