// Cancels, startup settings, pipelining, notifications and the pool: the checks of
// pgx_compat.go that involve more than one connection or one round trip.

package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

// cancelRequest: PgConn().CancelRequest (a plaintext CancelRequest on a new connection) while
// pg_sleep runs: the query ends with 57014 and the connection is usable.
func cancelRequest(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		started := time.Now()
		done := make(chan struct{})
		sent := make(chan int, 1)
		go func() {
			// Until the query is over: a cancel that arrives before the statement starts
			// cancels nothing, so send another every 200 ms.
			n := 0
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-done:
					sent <- n
					return
				case <-tick.C:
					cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					if conn.PgConn().CancelRequest(cctx) == nil {
						n++
					}
					cancel()
				}
			}
		}()
		qctx, cancel := context.WithTimeout(ctx, 25*time.Second)
		_, err := conn.Exec(qctx, "select pg_sleep(30)")
		cancel()
		close(done)
		cancels := <-sent
		if e := pgError(err, "57014"); e != nil {
			return nil, e
		}
		took := time.Since(started)
		var x int
		if err := conn.QueryRow(ctx, "select $1::int", 7).Scan(&x); err != nil || x != 7 {
			return nil, fmt.Errorf("after the cancel: %d %v", x, err)
		}
		return details{"cancels_sent": cancels, "seconds": took.Seconds()}, nil
	})
}

// contextDeadline: a context deadline interrupts pg_sleep. pgx v4 documents that the
// connection is then closed (pgconn sends a CancelRequest on a new plaintext connection, then
// Terminate); a new connection replaces it.
func contextDeadline(ctx context.Context) (details, error) {
	conn, err := connect(ctx, "")
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	started := time.Now()
	qctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = conn.Exec(qctx, "select pg_sleep(30)")
	cancel()
	if err == nil {
		return nil, errors.New("pg_sleep(30) returned within its 0.5 s deadline")
	}
	if !pgconn.Timeout(err) {
		return nil, fmt.Errorf("want a timeout error, got %T: %v", err, err)
	}
	if !conn.IsClosed() {
		return nil, errors.New("the connection is still open after the deadline")
	}
	select {
	case <-conn.PgConn().CleanupDone(): // the CancelRequest was answered, Terminate sent
	case <-time.After(20 * time.Second):
		return nil, errors.New("pgconn's cancel and close did not finish within 20 s")
	}
	took := time.Since(started)
	if took > 10*time.Second {
		return nil, fmt.Errorf("the deadline took %.1f s", took.Seconds())
	}
	return withConn(ctx, "", func(again *pgx.Conn) (details, error) {
		var x int
		if err := again.QueryRow(ctx, "select $1::int", 8).Scan(&x); err != nil || x != 8 {
			return nil, fmt.Errorf("the replacement connection: %d %v", x, err)
		}
		return details{"error": err.Error(), "seconds": took.Seconds()}, nil
	})
}

func settings(ctx context.Context) (details, error) {
	extra := "application_name=pgx-compat&search_path=" + url.QueryEscape("pg_catalog,public")
	return withConn(ctx, extra, func(conn *pgx.Conn) (details, error) {
		var app, path string
		if err := conn.QueryRow(ctx, "show application_name").Scan(&app); err != nil {
			return nil, err
		}
		if err := conn.QueryRow(ctx, "show search_path").Scan(&path); err != nil {
			return nil, err
		}
		if app != "pgx-compat" || conn.PgConn().ParameterStatus("application_name") != "pgx-compat" {
			return nil, fmt.Errorf("application_name %q (ParameterStatus %q)", app, conn.PgConn().ParameterStatus("application_name"))
		}
		if strings.ReplaceAll(path, " ", "") != "pg_catalog,public" {
			return nil, fmt.Errorf("search_path %q", path)
		}
		return details{"application_name": app, "search_path": path}, nil
	})
}

func batch(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		// pgx prepares every statement of a batch before it runs the first: the table exists.
		if _, err := conn.Exec(ctx, "create temp table bt (a int)"); err != nil {
			return nil, err
		}
		b := &pgx.Batch{}
		for i := 0; i < 50; i++ {
			b.Queue("insert into bt values ($1)", i)
		}
		b.Queue("select count(*)::int, sum(a)::int from bt")
		b.Queue("select 1 / $1::int", 0)
		br := conn.SendBatch(ctx, b)
		for i := 0; i < 50; i++ {
			if _, err := br.Exec(); err != nil {
				br.Close()
				return nil, fmt.Errorf("batch item %d: %w", i, err)
			}
		}
		var count, sum int
		if err := br.QueryRow().Scan(&count, &sum); err != nil || count != 50 || sum != 1225 {
			br.Close()
			return nil, fmt.Errorf("batch select: %d %d %v", count, sum, err)
		}
		var x int
		err := br.QueryRow().Scan(&x)
		if e := pgError(err, "22012"); e != nil {
			br.Close()
			return nil, e
		}
		if err := br.Close(); err != nil {
			if e := pgError(err, "22012"); e != nil {
				return nil, e
			}
		}
		// One Sync ends the batch: the error rolled back its implicit transaction, inserts too.
		if err := conn.QueryRow(ctx, "select count(*)::int from bt").Scan(&count); err != nil || count != 0 {
			return nil, fmt.Errorf("after the batch: %d %v", count, err)
		}
		return details{"queued": b.Len()}, nil
	})
}

func listenNotify(ctx context.Context) (details, error) {
	return withConn(ctx, "", func(conn *pgx.Conn) (details, error) {
		if _, err := conn.Exec(ctx, "listen lg_compat"); err != nil {
			return nil, err
		}
		return withConn(ctx, "", func(other *pgx.Conn) (details, error) {
			// Another session's notification names its backend (pg_backend_pid()).
			var sender uint32
			if err := other.QueryRow(ctx, "select pg_backend_pid()::int8 from pg_notify($1, $2)", "lg_compat", "hello").Scan(&sender); err != nil {
				return nil, err
			}
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			n, err := conn.WaitForNotification(wctx)
			if err != nil {
				return nil, err
			}
			if n.Channel != "lg_compat" || n.Payload != "hello" || n.PID != sender {
				return nil, fmt.Errorf("notification %+v (sender's backend pid %d)", n, sender)
			}
			// Its own notification carries the pid of its BackendKeyData: pgx's way of
			// telling its own from others'.
			if _, err := conn.Exec(ctx, "notify lg_compat, 'self'"); err != nil {
				return nil, err
			}
			own, err := conn.WaitForNotification(wctx)
			if err != nil {
				return nil, err
			}
			if own.Payload != "self" || own.PID != conn.PgConn().PID() {
				return nil, fmt.Errorf("own notification %+v (key pid %d)", own, conn.PgConn().PID())
			}
			var x int
			if err := conn.QueryRow(ctx, "select 5").Scan(&x); err != nil || x != 5 {
				return nil, fmt.Errorf("after the notification: %d %v", x, err)
			}
			return details{"payload": n.Payload, "notification_pid": n.PID,
				"sender_key_pid": other.PgConn().PID(), "own_pid": own.PID}, nil
		})
	})
}

func pool(ctx context.Context) (details, error) {
	pctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	p, err := pgxpool.Connect(pctx, connString(env("LG_SSLROOTCERT"), "pool_max_conns=4"))
	if err != nil {
		return nil, err
	}
	defer p.Close()
	if p.Stat().MaxConns() != 4 {
		return nil, fmt.Errorf("MaxConns %d", p.Stat().MaxConns())
	}
	// A deadline closes the pooled connection (cancel first); the pool replaces it.
	dctx, dcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = p.Exec(dctx, "select pg_sleep(30)")
	dcancel()
	if !pgconn.Timeout(err) {
		return nil, fmt.Errorf("pg_sleep(30) under a 0.3 s deadline: %v", err)
	}
	var mu sync.Mutex
	pids := map[uint32]bool{}
	users := map[string]bool{}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var pid uint32
			var user string
			var got int
			err := p.QueryRow(ctx, "select pg_backend_pid()::int8, current_user::text, $1::int from pg_sleep(0.05)", i).Scan(&pid, &user, &got)
			if err == nil && got != i {
				err = fmt.Errorf("query %d got %d", i, got)
			}
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			pids[pid] = true
			users[user] = true
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return nil, err
	}
	if len(pids) < 1 || len(pids) > 4 {
		return nil, fmt.Errorf("%d backends for a pool of 4", len(pids))
	}
	if total := p.Stat().TotalConns(); total > 4 {
		return nil, fmt.Errorf("%d connections in a pool of 4", total)
	}
	var names []string
	for u := range users {
		if u == env("LG_USER") {
			return nil, fmt.Errorf("a pooled session ran as %s", u)
		}
		names = append(names, u)
	}
	sort.Strings(names)
	return details{"backends": len(pids), "roles": names, "cancels_sent": 1}, nil
}
