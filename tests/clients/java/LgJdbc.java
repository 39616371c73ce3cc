// pgjdbc through leasegate with sslmode=verify-full and a client certificate, the key given
// as PKCS#8 DER (sslkey=....pk8) and as PKCS#12 (sslkey=....p12, alias "user", sslpassword):
// a query, one PreparedStatement run past the prepare threshold (so the driver switches to a
// named server-side statement), and a transaction (rollback, then commit).
//
// Run (single-file source launch, Java 11+):
//   java -cp /usr/share/java/postgresql.jar tests/clients/java/LgJdbc.java
// with LG_HOST, LG_PORT, LG_DBNAME, LG_USER, LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY_PK8,
// LG_SSLKEY_P12 and LG_P12_PASSWORD set. Prints one JSON line: versions and checks.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;

import org.postgresql.PGStatement;

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
        }
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
