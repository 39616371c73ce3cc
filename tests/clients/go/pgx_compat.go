// Command pgx_compat drives Go's pgx v4 (its own implementation of the protocol: no libpq)
// through leasegate with sslmode=verify-full and a client certificate.
//
// Driven by tests/integration/compat_pgx.rs, which builds it offline against Debian's
// packaged sources (apt-get install golang-go golang-github-jackc-pgx-v4-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o pgx_compat tests/clients/go/*.go
//
// The connection comes from the environment: LG_HOST (the name the server certificate must
// match), LG_PORT, LG_DBNAME, LG_USER (the Vault role), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY,
// and LG_WRONG_CA (a CA that did not sign leasegate's certificate).
//
// Prints one JSON line {"ok": ..., "checks": {...}, "go": ...} and exits 0 only when every
// check passed.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgtype"
	"github.com/jackc/pgx/v4"
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

// connString is what a Go user writes: a URL with the TLS files as query parameters, plus
// `extra` (more parameters, already escaped).
func connString(rootCert string, extra string) string {
	q := url.Values{}
	q.Set("sslmode", "verify-full")
	q.Set("sslrootcert", rootCert)
	q.Set("sslcert", env("LG_SSLCERT"))
	q.Set("sslkey", env("LG_SSLKEY"))
	s := fmt.Sprintf("postgres://%s@%s:%s/%s?%s", url.PathEscape(env("LG_USER")), env("LG_HOST"),
		env("LG_PORT"), url.PathEscape(env("LG_DBNAME")), q.Encode())
	if extra != "" {
		s += "&" + extra
	}
	return s
}

func connect(ctx context.Context, extra string) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	return pgx.Connect(ctx, connString(env("LG_SSLROOTCERT"), extra))
}

// withConn runs fn on a new connection and closes it after.
func withConn(ctx context.Context, extra string, fn func(*pgx.Conn) (details, error)) (details, error) {
	conn, err := connect(ctx, extra)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())
	return fn(conn)
}

// pgError returns the SQLSTATE of err if it is a *pgconn.PgError, else fails.
func pgError(err error, want string) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return fmt.Errorf("want a *pgconn.PgError %s, got %T: %v", want, err, err)
	}
	if pgErr.Code != want {
		return fmt.Errorf("SQLSTATE %s (%s), want %s", pgErr.Code, pgErr.Message, want)
	}
	return nil
}

func verifyFullTLS(ctx context.Context) (details, error) {
	d, err := withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		var user, version string
		if err := conn.QueryRow(ctx, "select current_user::text, current_setting('server_version')").Scan(&user, &version); err != nil {
			return nil, err
		}
		if user == env("LG_USER") {
			return nil, fmt.Errorf("session user %s is the Vault role, not a dynamic role", user)
		}
		return details{"session_user": user, "server_version": version}, nil
	})
	if err != nil {
		return nil, err
	}
	// Negative control: with another CA as sslrootcert, leasegate's certificate is refused.
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, connString(env("LG_WRONG_CA"), ""))
	if err == nil {
		conn.Close(ctx)
		return nil, errors.New("a server certificate from another CA was accepted")
	}
	if !strings.Contains(err.Error(), "x509") && !strings.Contains(err.Error(), "certificate") {
		return nil, fmt.Errorf("wrong CA: not a certificate error: %v", err)
	}
	d["wrong_ca_refused"] = err.Error()
	return d, nil
}

func simpleQuery(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		// No arguments: pgx sends a simple Query; several statements give several results.
		results, err := conn.PgConn().Exec(ctx, "select 1; select 'two', 2; create temp table sq (a int)").ReadAll()
		if err != nil {
			return nil, err
		}
		if len(results) != 3 || string(results[1].Rows[0][0]) != "two" || results[2].CommandTag.String() != "CREATE TABLE" {
			return nil, fmt.Errorf("multi-statement results %v", results)
		}
		tag, err := conn.Exec(ctx, "insert into sq select generate_series(1, 10)")
		if err != nil || tag.RowsAffected() != 10 {
			return nil, fmt.Errorf("insert: %v %v", tag, err)
		}
		return details{"results": len(results)}, nil
	})
}

func extendedBinary(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		ts := time.Date(2024, 2, 29, 13, 14, 15, 123456000, time.UTC)
		var num pgtype.Numeric
		if err := num.Set("12345.6789"); err != nil {
			return nil, err
		}
		blob := []byte{0, 1, 2, 0xfe, 0xff}
		ints := []int32{1, -2, 3}
		texts := []string{"a", "b c", "ü"}
		sql := "select $1::int8 + 1, $2::text || '!', $3::timestamptz + interval '1 day', $4::numeric, $4::numeric = 12345.6789, $5::bytea, $6::int4[], $7::text[]"
		for i := 0; i < 3; i++ { // the same SQL again: the cached named statement
			rows, err := conn.Query(ctx, sql, int64(41), "héllo", ts, &num, blob, ints, texts)
			if err != nil {
				return nil, err
			}
			var formats []int16
			for _, fd := range rows.FieldDescriptions() {
				formats = append(formats, fd.Format)
			}
			if !rows.Next() {
				rows.Close()
				return nil, fmt.Errorf("no row: %v", rows.Err())
			}
			var n int64
			var s string
			var t time.Time
			var gotNum pgtype.Numeric
			var equal bool
			var gotBlob []byte
			var gotInts []int32
			var gotTexts []string
			err = rows.Scan(&n, &s, &t, &gotNum, &equal, &gotBlob, &gotInts, &gotTexts)
			rows.Close()
			if err != nil {
				return nil, err
			}
			numText := fmt.Sprintf("%se%d", gotNum.Int, gotNum.Exp)
			switch {
			case n != 42 || s != "héllo!":
				return nil, fmt.Errorf("int/text %d %q", n, s)
			case !t.Equal(ts.Add(24 * time.Hour)):
				return nil, fmt.Errorf("timestamptz %v", t)
			case numText != "123456789e-4" || !equal:
				return nil, fmt.Errorf("numeric %v (= sent: %v)", numText, equal)
			case !bytes.Equal(gotBlob, blob):
				return nil, fmt.Errorf("bytea %x", gotBlob)
			case fmt.Sprint(gotInts) != fmt.Sprint(ints) || fmt.Sprint(gotTexts) != fmt.Sprint(texts):
				return nil, fmt.Errorf("arrays %v %v", gotInts, gotTexts)
			}
			for i, f := range formats { // pgx reads text as text, every other column in binary
				if (i == 1) != (f == pgx.TextFormatCode) {
					return nil, fmt.Errorf("result formats %v, want binary but for the text", formats)
				}
			}
		}
		var cached int
		if err := conn.QueryRow(ctx, "select count(*)::int from pg_prepared_statements where name like 'lrupsc%' and statement = $1", sql).Scan(&cached); err != nil {
			return nil, err
		}
		if cached != 1 {
			return nil, fmt.Errorf("%d named statements lrupsc_* for the query, want 1", cached)
		}
		return details{"named_statements": cached}, nil
	})
}

func prepare(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		sd, err := conn.Prepare(ctx, "lg_add", "select $1::int + $2::int")
		if err != nil {
			return nil, err
		}
		sum := 0
		for i := 0; i < 10; i++ {
			var v int
			if err := conn.QueryRow(ctx, "lg_add", i, 1).Scan(&v); err != nil {
				return nil, err
			}
			sum += v
		}
		if sum != 55 {
			return nil, fmt.Errorf("sum %d", sum)
		}
		var n int
		if err := conn.QueryRow(ctx, "select count(*)::int from pg_prepared_statements where name = 'lg_add'").Scan(&n); err != nil || n != 1 {
			return nil, fmt.Errorf("lg_add in pg_prepared_statements: %d %v", n, err)
		}
		if err := conn.Deallocate(ctx, "lg_add"); err != nil {
			return nil, err
		}
		if err := conn.QueryRow(ctx, "select count(*)::int from pg_prepared_statements where name = 'lg_add'").Scan(&n); err != nil || n != 0 {
			return nil, fmt.Errorf("lg_add after Deallocate: %d %v", n, err)
		}
		return details{"params": len(sd.ParamOIDs)}, nil
	})
}

func transactions(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		if _, err := conn.Exec(ctx, "create temp table tx (id int primary key, v text)"); err != nil {
			return nil, err
		}
		tx, err := conn.Begin(ctx)
		if err != nil {
			return nil, err
		}
		defer tx.Rollback(ctx)
		if _, err := tx.Exec(ctx, "insert into tx values ($1, $2), (2, 'b')", 1, "a"); err != nil {
			return nil, err
		}
		sp, err := tx.Begin(ctx) // a savepoint
		if err != nil {
			return nil, err
		}
		if _, err := sp.Exec(ctx, "insert into tx values (3, 'inner')"); err != nil {
			return nil, err
		}
		if err := sp.Rollback(ctx); err != nil {
			return nil, err
		}
		// An error inside the savepoint rolls back to it; the outer transaction goes on.
		sp2, err := tx.Begin(ctx)
		if err != nil {
			return nil, err
		}
		_, err = sp2.Exec(ctx, "insert into tx values (1, 'duplicate')")
		if e := pgError(err, "23505"); e != nil {
			return nil, e
		}
		if err := sp2.Rollback(ctx); err != nil {
			return nil, err
		}
		if _, err := tx.Exec(ctx, "insert into tx values (4, 'outer')"); err != nil {
			return nil, err
		}
		if err := tx.Commit(ctx); err != nil {
			return nil, err
		}
		tx2, err := conn.Begin(ctx)
		if err != nil {
			return nil, err
		}
		if _, err := tx2.Exec(ctx, "insert into tx values (5, 'rolled back')"); err != nil {
			return nil, err
		}
		if err := tx2.Rollback(ctx); err != nil {
			return nil, err
		}
		var ids []int32
		if err := conn.QueryRow(ctx, "select array_agg(id order by id) from tx").Scan(&ids); err != nil {
			return nil, err
		}
		if fmt.Sprint(ids) != "[1 2 4]" {
			return nil, fmt.Errorf("committed rows %v", ids)
		}
		return details{"ids": ids}, nil
	})
}

func errorsThenUsable(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		if _, err := conn.Exec(ctx, "create temp table uq (id int primary key)"); err != nil {
			return nil, err
		}
		if _, err := conn.Exec(ctx, "insert into uq values ($1)", 1); err != nil {
			return nil, err
		}
		_, err := conn.Exec(ctx, "insert into uq values ($1)", 1)
		if e := pgError(err, "23505"); e != nil {
			return nil, e
		}
		var x int
		err = conn.QueryRow(ctx, "select 1 / $1::int", 0).Scan(&x)
		if e := pgError(err, "22012"); e != nil {
			return nil, e
		}
		_, err = conn.Exec(ctx, "select 1/0") // simple protocol
		if e := pgError(err, "22012"); e != nil {
			return nil, e
		}
		if err := conn.QueryRow(ctx, "select $1::int * 2", 21).Scan(&x); err != nil || x != 42 {
			return nil, fmt.Errorf("after the errors: %d %v", x, err)
		}
		return details{"sqlstates": []string{"23505", "22012"}}, nil
	})
}

func copyInOut(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		if _, err := conn.Exec(ctx, "create temp table cp (a int, b text, t timestamptz)"); err != nil {
			return nil, err
		}
		ts := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
		rows := make([][]interface{}, 0, 5000)
		for i := 0; i < 5000; i++ {
			rows = append(rows, []interface{}{int32(i), fmt.Sprintf("r%d", i), ts})
		}
		n, err := conn.CopyFrom(ctx, pgx.Identifier{"cp"}, []string{"a", "b", "t"}, pgx.CopyFromRows(rows))
		if err != nil || n != 5000 {
			return nil, fmt.Errorf("CopyFrom: %d %v", n, err)
		}
		var sum int64
		if err := conn.QueryRow(ctx, "select sum(a) from cp where t = $1", ts).Scan(&sum); err != nil || sum != 4999*5000/2 {
			return nil, fmt.Errorf("copied rows: sum %d %v", sum, err)
		}
		var out bytes.Buffer
		tag, err := conn.PgConn().CopyTo(ctx, &out, "copy (select a, b from cp where a < 3 order by a) to stdout")
		if err != nil {
			return nil, err
		}
		if out.String() != "0\tr0\n1\tr1\n2\tr2\n" || tag.RowsAffected() != 3 {
			return nil, fmt.Errorf("CopyTo %q %v", out.String(), tag)
		}
		// A failing COPY leaves the session usable.
		_, err = conn.CopyFrom(ctx, pgx.Identifier{"cp"}, []string{"a", "b", "t"},
			pgx.CopyFromRows([][]interface{}{{int32(1), "x", ts}, {"not an int", "y", ts}}))
		if err == nil {
			return nil, errors.New("CopyFrom with a bad value succeeded")
		}
		var count int
		if err := conn.QueryRow(ctx, "select count(*)::int from cp").Scan(&count); err != nil || count != 5000 {
			return nil, fmt.Errorf("after the failed COPY: %d %v", count, err)
		}
		return details{"copy_in": n, "copy_out_rows": tag.RowsAffected()}, nil
	})
}

// overSocket connects through leasegate's Unix socket (LG_SOCKET_DIR, no TLS, no
// certificate: the kernel vouches for the OS user) and prints the session user.
func overSocket(dir string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dsn := fmt.Sprintf("host=%s port=%s dbname=myapp user=readonly sslmode=disable", dir, os.Getenv("LG_PORT"))
	conn, err := pgx.Connect(ctx, dsn)
	if err == nil {
		var user string
		err = conn.QueryRow(ctx, "select current_user::text").Scan(&user)
		conn.Close(ctx)
		if err == nil {
			fmt.Printf("{\"user\": %q}\n", user)
			return
		}
	}
	fmt.Printf("{\"error\": %q}\n", err.Error())
	os.Exit(1)
}

func main() {
	if dir := os.Getenv("LG_SOCKET_DIR"); dir != "" {
		overSocket(dir)
		return
	}
	result := map[string]interface{}{"client": "pgx", "go": runtime.Version()}
	checks := map[string]interface{}{}
	ok := true
	ctx := context.Background()
	for _, c := range []struct {
		name string
		fn   func(context.Context) (details, error)
	}{
		{"verify_full_tls", verifyFullTLS}, {"simple_query", simpleQuery},
		{"extended_binary", extendedBinary}, {"prepare", prepare},
		{"transactions", transactions}, {"errors_then_usable", errorsThenUsable},
		{"copy", copyInOut}, {"cancel_request", cancelRequest},
		{"context_deadline", contextDeadline}, {"settings", settings},
		{"batch", batch}, {"listen_notify", listenNotify}, {"pool", pool},
	} {
		started := time.Now()
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		d, err := c.fn(cctx)
		cancel()
		if err != nil {
			ok = false
			checks[c.name] = details{"ok": false, "error": fmt.Sprintf("%T: %v", err, err)}
			continue
		}
		d["ok"] = true
		d["ms"] = time.Since(started).Milliseconds()
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
