// Command pq_compat drives Go's lib/pq (database/sql driver, its own protocol implementation:
// no libpq) through leasegate with sslmode=verify-full, sslrootcert, sslcert and sslkey.
//
// Driven by tests/integration/compat_libpq_go.rs, which builds it offline against Debian's
// packaged sources (apt-get install golang-go golang-github-lib-pq-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o pq_compat tests/clients/go-libpq/*.go
//
// The connection comes from the environment: LG_HOST (the name the server certificate must
// match), LG_PORT, LG_DBNAME, LG_USER (the Vault role), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY,
// and LG_WRONG_CA (a CA that did not sign leasegate's certificate).
//
// Prints one JSON line {"ok": ..., "checks": {...}, "go": ...} and exits 0 only when every
// check passed.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"time"

	"github.com/lib/pq"
)

type details map[string]interface{}

func env(name string) string {
	v := os.Getenv(name)
	if v == "" {
		fmt.Fprintf(os.Stderr, "%s is not set\n", name)
		os.Exit(2)
	}
	return v
}

// dsn is what a lib/pq user writes: libpq-style keywords with the TLS files.
func dsn(rootCert, key string) string {
	return fmt.Sprintf("host=%s port=%s dbname=%s user=%s sslmode=verify-full sslrootcert=%s "+
		"sslcert=%s sslkey=%s connect_timeout=15 application_name=lib-pq-compat",
		env("LG_HOST"), env("LG_PORT"), env("LG_DBNAME"), env("LG_USER"), rootCert,
		env("LG_SSLCERT"), key)
}

func goodDSN() string { return dsn(env("LG_SSLROOTCERT"), env("LG_SSLKEY")) }

func open() (*sql.DB, error) {
	db, err := sql.Open("postgres", goodDSN())
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

func withDB(fn func(*sql.DB) (details, error)) (details, error) {
	db, err := open()
	if err != nil {
		return nil, err
	}
	defer db.Close()
	return fn(db)
}

// sqlstate is the code of err if it is a *pq.Error.
func sqlstate(err error) string {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		return string(pqErr.Code)
	}
	return fmt.Sprintf("not a *pq.Error: %T %v", err, err)
}

func verifyFullTLS(ctx context.Context) (details, error) {
	d, err := withDB(func(db *sql.DB) (details, error) {
		var user string
		if err := db.QueryRowContext(ctx, "select current_user::text").Scan(&user); err != nil {
			return nil, err
		}
		if user == env("LG_USER") {
			return nil, fmt.Errorf("session user %s is the Vault role", user)
		}
		return details{"session_user": user, "password_asked": false}, nil
	})
	if err != nil {
		return nil, err
	}
	// Another CA as sslrootcert: leasegate's certificate is refused.
	bad, _ := sql.Open("postgres", dsn(env("LG_WRONG_CA"), env("LG_SSLKEY")))
	err = bad.PingContext(ctx)
	bad.Close()
	if err == nil || (!strings.Contains(err.Error(), "x509") && !strings.Contains(err.Error(), "certificate")) {
		return nil, fmt.Errorf("another CA: want a certificate error, got %v", err)
	}
	d["wrong_ca_refused"] = err.Error()
	// lib/pq refuses a key file others can read, before it connects.
	loose := filepath.Join(os.TempDir(), fmt.Sprintf("pq-compat-key-%d.pem", os.Getpid()))
	key, err := os.ReadFile(env("LG_SSLKEY"))
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(loose, key, 0o644); err != nil {
		return nil, err
	}
	defer os.Remove(loose)
	if err := os.Chmod(loose, 0o644); err != nil {
		return nil, err
	}
	bad, _ = sql.Open("postgres", dsn(env("LG_SSLROOTCERT"), loose))
	err = bad.PingContext(ctx)
	bad.Close()
	if !errors.Is(err, pq.ErrSSLKeyHasWorldPermissions) {
		return nil, fmt.Errorf("a 0644 key file: want ErrSSLKeyHasWorldPermissions, got %v", err)
	}
	d["loose_key_refused"] = err.Error()
	return d, nil
}

func queries(ctx context.Context) (details, error) {
	return withDB(func(db *sql.DB) (details, error) {
		// No arguments: lib/pq sends a simple Query (several statements allowed).
		if _, err := db.ExecContext(ctx, "create temp table q (id int primary key, v text, b bytea); insert into q values (1, 'one', '\\x00ff')"); err != nil {
			return nil, err
		}
		// Arguments: an unnamed statement (Parse/Bind/Execute), results in text, bytea binary.
		var i int
		var s string
		var b []byte
		var ts time.Time
		var arr pq.Int64Array
		when := time.Date(2024, 5, 6, 7, 8, 9, 123456000, time.UTC)
		err := db.QueryRowContext(ctx, "select $1::int + 1, $2::text || '!', $3::bytea, $4::timestamptz, $5::int8[]",
			41, "héllo", []byte{0, 1, 255}, when, pq.Array([]int64{1, 2, 3})).Scan(&i, &s, &b, &ts, &arr)
		if err != nil {
			return nil, err
		}
		if i != 42 || s != "héllo!" || string(b) != "\x00\x01\xff" || !ts.Equal(when) || len(arr) != 3 || arr[2] != 3 {
			return nil, fmt.Errorf("values %v %q %x %v %v", i, s, b, ts, arr)
		}
		var n int
		big := strings.Repeat("x", 3<<20)
		if err := db.QueryRowContext(ctx, "select length($1::text)", big).Scan(&n); err != nil || n != len(big) {
			return nil, fmt.Errorf("3 MiB parameter: %d %v", n, err)
		}
		return details{"rows": 1}, nil
	})
}

func prepared(ctx context.Context) (details, error) {
	return withDB(func(db *sql.DB) (details, error) {
		stmt, err := db.PrepareContext(ctx, "select $1::int * 2, $2::text")
		if err != nil {
			return nil, err
		}
		for i := 0; i < 10; i++ {
			var d int
			var t string
			if err := stmt.QueryRowContext(ctx, i, fmt.Sprintf("x%d", i)).Scan(&d, &t); err != nil || d != 2*i {
				return nil, fmt.Errorf("run %d: %d %v", i, d, err)
			}
		}
		var named int
		if err := db.QueryRowContext(ctx, "select count(*) from pg_prepared_statements").Scan(&named); err != nil || named != 1 {
			return nil, fmt.Errorf("%d named statements (%v)", named, err)
		}
		if err := stmt.Close(); err != nil {
			return nil, err
		}
		return details{"named_statements": named}, nil
	})
}

func errorsAndTransactions(ctx context.Context) (details, error) {
	return withDB(func(db *sql.DB) (details, error) {
		if _, err := db.ExecContext(ctx, "create temp table tx (id int primary key)"); err != nil {
			return nil, err
		}
		codes := map[string]string{}
		_, err := db.ExecContext(ctx, "insert into tx values ($1), ($1)", 1)
		codes["unique_violation"] = sqlstate(err)
		_, err = db.ExecContext(ctx, "select 1/0")
		codes["division_by_zero"] = sqlstate(err)
		_, err = db.ExecContext(ctx, "selec 1")
		codes["syntax_error"] = sqlstate(err)
		if codes["unique_violation"] != "23505" || codes["division_by_zero"] != "22012" || codes["syntax_error"] != "42601" {
			return nil, fmt.Errorf("sqlstates %v", codes)
		}
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return nil, err
		}
		for _, q := range []string{"insert into tx values (1)", "savepoint s1"} {
			if _, err := tx.ExecContext(ctx, q); err != nil {
				return nil, err
			}
		}
		_, err = tx.ExecContext(ctx, "insert into tx values (1)")
		if sqlstate(err) != "23505" {
			return nil, fmt.Errorf("in the savepoint: %v", err)
		}
		for _, q := range []string{"rollback to savepoint s1", "insert into tx values (2)"} {
			if _, err := tx.ExecContext(ctx, q); err != nil {
				return nil, err
			}
		}
		if err := tx.Commit(); err != nil {
			return nil, err
		}
		tx, _ = db.BeginTx(ctx, nil)
		tx.ExecContext(ctx, "insert into tx values (3)")
		if err := tx.Rollback(); err != nil {
			return nil, err
		}
		var ids string
		if err := db.QueryRowContext(ctx, "select string_agg(id::text, ',' order by id) from tx").Scan(&ids); err != nil || ids != "1,2" {
			return nil, fmt.Errorf("committed ids %q %v", ids, err)
		}
		return details{"sqlstates": codes, "ids": ids}, nil
	})
}

func copyIn(ctx context.Context) (details, error) {
	return withDB(func(db *sql.DB) (details, error) {
		if _, err := db.ExecContext(ctx, "create temp table cp (a int, b text)"); err != nil {
			return nil, err
		}
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return nil, err
		}
		stmt, err := tx.PrepareContext(ctx, pq.CopyIn("cp", "a", "b"))
		if err != nil {
			return nil, err
		}
		for i := 0; i < 20000; i++ {
			if _, err := stmt.ExecContext(ctx, i, fmt.Sprintf("r%d", i)); err != nil {
				return nil, err
			}
		}
		if _, err := stmt.ExecContext(ctx); err != nil {
			return nil, err
		}
		stmt.Close()
		if err := tx.Commit(); err != nil {
			return nil, err
		}
		var n int
		if err := db.QueryRowContext(ctx, "select count(*) from cp").Scan(&n); err != nil || n != 20000 {
			return nil, fmt.Errorf("COPY IN: %d rows %v", n, err)
		}
		// A COPY the server rejects (a NULL into a NOT NULL column): 23502, the session goes on.
		db.ExecContext(ctx, "create temp table nn (a int not null)")
		tx, _ = db.BeginTx(ctx, nil)
		stmt, err = tx.PrepareContext(ctx, pq.CopyIn("nn", "a"))
		if err != nil {
			return nil, err
		}
		stmt.ExecContext(ctx, 1)
		stmt.ExecContext(ctx, nil)
		_, err = stmt.ExecContext(ctx)
		stmt.Close()
		tx.Rollback()
		code := sqlstate(err)
		if code != "23502" {
			return nil, fmt.Errorf("failed COPY: %v", err)
		}
		var one int
		if err := db.QueryRowContext(ctx, "select 1").Scan(&one); err != nil {
			return nil, fmt.Errorf("after the failed COPY: %v", err)
		}
		return details{"copy_in": n, "failed_copy": code}, nil
	})
}

func contextCancel(ctx context.Context) (details, error) {
	return withDB(func(db *sql.DB) (details, error) {
		cctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		started := time.Now()
		_, err := db.ExecContext(cctx, "select pg_sleep(30)")
		took := time.Since(started)
		// lib/pq sends a CancelRequest (TLS, new connection) and returns the server's 57014.
		if sqlstate(err) != "57014" {
			return nil, fmt.Errorf("pg_sleep under a 0.5 s deadline: %v", err)
		}
		if took > 10*time.Second {
			return nil, fmt.Errorf("the cancel took %v", took)
		}
		var one int
		if err := db.QueryRowContext(ctx, "select 1").Scan(&one); err != nil {
			return nil, fmt.Errorf("after the cancel: %v", err)
		}
		return details{"sqlstate": "57014", "ms": took.Milliseconds()}, nil
	})
}

// keyPID is the pid of the BackendKeyData the driver connection got (lib/pq keeps it private).
func keyPID(conn *sql.Conn) (int64, error) {
	var pid int64
	err := conn.Raw(func(dc interface{}) error {
		v := reflect.ValueOf(dc)
		if v.Kind() != reflect.Ptr || !v.Elem().FieldByName("processID").IsValid() {
			return fmt.Errorf("driver connection %T has no processID", dc)
		}
		pid = v.Elem().FieldByName("processID").Int()
		return nil
	})
	return pid, err
}

func listen(ctx context.Context) (details, error) {
	got := make(chan *pq.Notification, 4)
	listener := pq.NewListener(goodDSN(), 100*time.Millisecond, time.Second, nil)
	defer listener.Close()
	if err := listener.Listen("lg_compat"); err != nil {
		return nil, err
	}
	db, err := open()
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var sender int
	if err := db.QueryRowContext(ctx, "select pg_backend_pid()").Scan(&sender); err != nil {
		return nil, err
	}
	if _, err := db.ExecContext(ctx, "select pg_notify('lg_compat', $1)", "hello"); err != nil {
		return nil, err
	}
	var n *pq.Notification
	select {
	case n = <-listener.Notify:
	case <-time.After(10 * time.Second):
		return nil, errors.New("no notification within 10 s")
	}
	if n == nil || n.Extra != "hello" || n.BePid != sender {
		return nil, fmt.Errorf("notification %+v, sender backend %d", n, sender)
	}
	// A session's own notification (a connector with a notification handler) carries the pid
	// of its BackendKeyData.
	base, err := pq.NewConnector(goodDSN())
	if err != nil {
		return nil, err
	}
	own := sql.OpenDB(pq.ConnectorWithNotificationHandler(base, func(n *pq.Notification) { got <- n }))
	defer own.Close()
	conn, err := own.Conn(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "listen lg_own"); err != nil {
		return nil, err
	}
	if _, err := conn.ExecContext(ctx, "notify lg_own, 'mine'"); err != nil {
		return nil, err
	}
	pid, err := keyPID(conn)
	if err != nil {
		return nil, err
	}
	select {
	case m := <-got:
		if int64(m.BePid) != pid {
			return nil, fmt.Errorf("own notification pid %d, BackendKeyData pid %d", m.BePid, pid)
		}
		return details{"other_pid": n.BePid, "own_pid": m.BePid, "key_pid": pid}, nil
	case <-time.After(10 * time.Second):
		return nil, errors.New("no own notification within 10 s")
	}
}

// binaryParameters: with binary_parameters=yes lib/pq sends Parse, Bind (bytea values in
// binary), Describe, Execute and Sync in one go, without a round trip for the statement.
func binaryParameters(ctx context.Context) (details, error) {
	db, err := sql.Open("postgres", goodDSN()+" binary_parameters=yes")
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var n int
	var b []byte
	var s string
	blob := []byte{0, 1, 2, 255, 254}
	if err := db.QueryRowContext(ctx, "select length($1::bytea), $1::bytea, $2::text", blob, "ü").Scan(&n, &b, &s); err != nil {
		return nil, err
	}
	if n != len(blob) || string(b) != string(blob) || s != "ü" {
		return nil, fmt.Errorf("binary parameters: %d %x %q", n, b, s)
	}
	var pipelined int
	for i := 0; i < 20; i++ {
		var v int
		if err := db.QueryRowContext(ctx, "select $1::int + 1", i).Scan(&v); err != nil || v != i+1 {
			return nil, fmt.Errorf("run %d: %d %v", i, v, err)
		}
		pipelined++
	}
	_, err = db.ExecContext(ctx, "select 1/$1::int", 0)
	if sqlstate(err) != "22012" {
		return nil, fmt.Errorf("an error in a one-round-trip query: %v", err)
	}
	return details{"queries": pipelined}, nil
}

// overSocket connects over leasegate's Unix socket in `dir` (no TLS, no certificate: lib/pq
// takes a directory as host) and prints {"user": current_user}.
func overSocket(dir string) {
	db, err := sql.Open("postgres", fmt.Sprintf("host=%s port=%s dbname=myapp user=readonly sslmode=disable",
		dir, env("LG_PORT")))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer db.Close()
	var user string
	if err := db.QueryRow("select current_user::text").Scan(&user); err != nil {
		fmt.Println(`{"ok": false}`)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	line, _ := json.Marshal(map[string]string{"user": user})
	fmt.Println(string(line))
}

func main() {
	if dir := os.Getenv("LG_SOCKET_DIR"); dir != "" {
		overSocket(dir)
		return
	}
	result := map[string]interface{}{"client": "lib/pq", "go": runtime.Version()}
	checks := map[string]interface{}{}
	ok := true
	for _, c := range []struct {
		name string
		fn   func(context.Context) (details, error)
	}{
		{"verify_full_tls", verifyFullTLS}, {"queries", queries}, {"prepared", prepared},
		{"errors_and_transactions", errorsAndTransactions}, {"copy_in", copyIn},
		{"context_cancel", contextCancel}, {"listen_notify", listen},
		{"binary_parameters", binaryParameters},
	} {
		started := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		d, err := c.fn(ctx)
		cancel()
		if err != nil {
			ok = false
			checks[c.name] = details{"ok": false, "error": fmt.Sprintf("%T: %v", err, err)}
			continue
		}
		d["ok"] = true
		if _, set := d["ms"]; !set {
			d["ms"] = time.Since(started).Milliseconds()
		}
		checks[c.name] = d
	}
	result["checks"] = checks
	result["ok"] = ok
	line, err := json.Marshal(result)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(string(line))
	if !ok {
		os.Exit(1)
	}
}
