// pgjdbc through leasegate with sslmode=verify-full and a client certificate, the key given
// as PKCS#8 DER (sslkey=....pk8) and as PKCS#12 (sslkey=....p12, alias "user", sslpassword):
// a query, one PreparedStatement run past the prepare threshold (so the driver switches to a
// named server-side statement), a transaction (rollback, then commit), SQLSTATEs of errors with
// the connection usable after, a batch, a query timeout (pgjdbc cancels with a CancelRequest on
// a new connection), CopyManager in and out, LISTEN/NOTIFY (its own notification carries
// getBackendPID()), startup settings (ApplicationName, options) and DatabaseMetaData.
//
// Run (single-file source launch, Java 11+):
//   java -cp /usr/share/java/postgresql.jar tests/clients/java/LgJdbc.java
// with LG_HOST, LG_PORT, LG_DBNAME, LG_USER, LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY_PK8,
// LG_SSLKEY_P12 and LG_P12_PASSWORD set. Prints one JSON line: versions and checks.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class LgJdbc {
    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            throw new IllegalStateException("environment variable " + name + " is not set");
        }
        return v;
    }

    static String url() {
        return "jdbc:postgresql://" + env("LG_HOST") + ":" + env("LG_PORT") + "/" + env("LG_DBNAME");
    }

    static Properties tls(String key) {
        Properties p = new Properties();
        p.setProperty("user", env("LG_USER"));
        p.setProperty("sslmode", "verify-full");
        p.setProperty("sslrootcert", env("LG_SSLROOTCERT"));
        p.setProperty("sslcert", env("LG_SSLCERT"));
        p.setProperty("sslkey", key);
        p.setProperty("connectTimeout", "15");
        return p;
    }

    static String quote(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") + "\"";
    }

    static String currentUser(Connection c) throws Exception {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("select current_user")) {
            rs.next();
            return rs.getString(1);
        }
    }

    /** The same PreparedStatement 10 times: pgjdbc switches to a server-side statement at
     * prepareThreshold (5 by default). Returns how many runs were server-prepared. */
    static int prepared(Connection c) throws Exception {
        int serverPrepared = 0;
        try (PreparedStatement ps = c.prepareStatement("select ?::int * 2")) {
            for (int i = 1; i <= 10; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (rs.getInt(1) != 2 * i) {
                        throw new IllegalStateException("wrong result at run " + i);
                    }
                }
                if (ps.unwrap(PGStatement.class).isUseServerPrepare()) {
                    serverPrepared++;
                }
            }
        }
        return serverPrepared;
    }

    /** Rollback discards, commit keeps. Returns the row count after both. */
    static int transaction(Connection c) throws Exception {
        try (Statement st = c.createStatement()) {
            st.execute("create temp table t (x int)");
            c.setAutoCommit(false);
            st.execute("insert into t values (1)");
            c.rollback();
            st.execute("insert into t values (2)");
            st.execute("insert into t values (3)");
            c.commit();
            c.setAutoCommit(true);
            try (ResultSet rs = st.executeQuery("select count(*) from t")) {
                rs.next();
                return rs.getInt(1);
            }
        }
    }

    static int scalar(Connection c, String sql) throws Exception {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getInt(1);
        }
    }

    /** The SQLSTATE the statement fails with ("" when it does not fail). */
    static String stateOf(Connection c, String sql) {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
            return "";
        } catch (SQLException e) {
            return e.getSQLState();
        }
    }

    /** 23505 and 22012, and the connection answers after each. */
    static String errors(Connection c) throws Exception {
        try (Statement st = c.createStatement()) {
            st.execute("create temp table u (k int primary key)");
            st.execute("insert into u values (1)");
        }
        String dup = stateOf(c, "insert into u values (1)");
        int after = scalar(c, "select 1");
        String div = stateOf(c, "select 1 / 0");
        int after2 = scalar(c, "select 2");
        boolean ok = dup.equals("23505") && div.equals("22012") && after == 1 && after2 == 2;
        return "{\"ok\": " + ok + ", \"unique\": " + quote(dup) + ", \"division\": " + quote(div) + "}";
    }

    /** executeBatch of 100 inserts, then their count. */
    static String batch(Connection c) throws Exception {
        try (Statement st = c.createStatement()) {
            st.execute("create temp table b (x int)");
        }
        int[] counts;
        try (PreparedStatement ps = c.prepareStatement("insert into b values (?)")) {
            for (int i = 0; i < 100; i++) {
                ps.setInt(1, i);
                ps.addBatch();
            }
            counts = ps.executeBatch();
        }
        int rows = scalar(c, "select count(*) from b");
        return "{\"ok\": " + (counts.length == 100 && rows == 100) + ", \"rows\": " + rows + "}";
    }

    /** setQueryTimeout(1) on pg_sleep(30): pgjdbc sends a CancelRequest; 57014, then usable. */
    static String timeout(Connection c) throws Exception {
        long start = System.nanoTime();
        String state = "";
        try (Statement st = c.createStatement()) {
            st.setQueryTimeout(1);
            st.execute("select pg_sleep(30)");
        } catch (SQLException e) {
            state = e.getSQLState();
        }
        long ms = (System.nanoTime() - start) / 1_000_000;
        int after = scalar(c, "select 3");
        boolean ok = state.equals("57014") && ms < 15_000 && after == 3;
        return "{\"ok\": " + ok + ", \"sqlstate\": " + quote(state) + ", \"ms\": " + ms + "}";
    }

    /** CopyManager: 500 rows in, the same out. */
    static String copy(Connection c) throws Exception {
        try (Statement st = c.createStatement()) {
            st.execute("create temp table cp (k int, v text)");
        }
        StringBuilder in = new StringBuilder();
        for (int i = 0; i < 500; i++) {
            in.append(i).append('\t').append("row ").append(i).append('\n');
        }
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        long loaded = cm.copyIn("copy cp from stdin", new StringReader(in.toString()));
        StringWriter out = new StringWriter();
        long dumped = cm.copyOut("copy (select * from cp order by k) to stdout", out);
        boolean ok = loaded == 500 && dumped == 500 && out.toString().equals(in.toString());
        return "{\"ok\": " + ok + ", \"in\": " + loaded + ", \"out\": " + dumped + "}";
    }

    /** LISTEN, NOTIFY on the same connection: the notification's pid is getBackendPID(). */
    static String notify(Connection c) throws Exception {
        PGConnection pg = c.unwrap(PGConnection.class);
        try (Statement st = c.createStatement()) {
            st.execute("listen lg_jdbc");
            st.execute("notify lg_jdbc, 'hello'");
        }
        PGNotification[] got = pg.getNotifications(5000);
        boolean ok = got != null && got.length == 1 && got[0].getName().equals("lg_jdbc")
            && got[0].getParameter().equals("hello") && got[0].getPID() == pg.getBackendPID();
        String pid = got != null && got.length > 0 ? String.valueOf(got[0].getPID()) : "null";
        return "{\"ok\": " + ok + ", \"pid\": " + pid + ", \"backend_pid\": " + pg.getBackendPID() + "}";
    }

    /** ApplicationName and options=-c search_path=... from the properties, seen by SHOW;
     * DatabaseMetaData finds a table. */
    static String settings(String key) throws Exception {
        Properties p = tls(key);
        p.setProperty("ApplicationName", "lg-jdbc");
        p.setProperty("options", "-c search_path=lg_jdbc_schema,public");
        try (Connection c = DriverManager.getConnection(url(), p); Statement st = c.createStatement()) {
            String app;
            String path;
            try (ResultSet rs = st.executeQuery("show application_name")) {
                rs.next();
                app = rs.getString(1);
            }
            try (ResultSet rs = st.executeQuery("show search_path")) {
                rs.next();
                path = rs.getString(1);
            }
            st.execute("create temp table meta_t (x int)");
            boolean found;
            try (ResultSet rs = c.getMetaData().getTables(null, null, "meta_t", null)) {
                found = rs.next();
            }
            boolean ok = app.equals("lg-jdbc") && path.replace(" ", "").equals("lg_jdbc_schema,public") && found;
            return "{\"ok\": " + ok + ", \"application_name\": " + quote(app) + ", \"search_path\": " + quote(path) + "}";
        }
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> checks = new LinkedHashMap<>();
        String driver = "?";
        try (Connection c = DriverManager.getConnection(url(), tls(env("LG_SSLKEY_PK8")))) {
            driver = c.getMetaData().getDriverVersion();
            checks.put("verify_full_pk8", "{\"ok\": true, \"session_user\": " + quote(currentUser(c)) + "}");
            int server = prepared(c);
            checks.put("prepare_threshold", "{\"ok\": " + (server >= 5) + ", \"server_prepared_runs\": " + server + "}");
            int rows = transaction(c);
            checks.put("transaction", "{\"ok\": " + (rows == 2) + ", \"rows\": " + rows + "}");
            checks.put("errors", errors(c));
            checks.put("batch", batch(c));
            checks.put("query_timeout", timeout(c));
            checks.put("copy", copy(c));
            checks.put("notify", notify(c));
        }
        checks.put("settings", settings(env("LG_SSLKEY_PK8")));
        Properties p12 = tls(env("LG_SSLKEY_P12"));
        p12.setProperty("sslpassword", env("LG_P12_PASSWORD"));
        try (Connection c = DriverManager.getConnection(url(), p12)) {
            checks.put("verify_full_p12", "{\"ok\": true, \"session_user\": " + quote(currentUser(c)) + "}");
        }
        StringBuilder out = new StringBuilder();
        out.append("{\"pgjdbc\": ").append(quote(driver));
        out.append(", \"java\": ").append(quote(System.getProperty("java.version")));
        out.append(", \"checks\": {");
        boolean first = true;
        for (Map.Entry<String, String> e : checks.entrySet()) {
            if (!first) out.append(", ");
            first = false;
            out.append(quote(e.getKey())).append(": ").append(e.getValue());
        }
        out.append("}}");
        System.out.println(out);
    }
}
