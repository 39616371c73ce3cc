//! More clients over the local Unix socket (`listen.unix_socket_dir`, grant `unix:user=root`,
//! no certificate): pg8000 (`unix_sock=<dir>/.s.PGSQL.<port>`), Postgres.js (`path`), Go lib/pq
//! (`host=<dir> sslmode=disable`), psycopg2 and Perl DBD::Pg (libpq, `host=<dir>`), each
//! reading its `current_user`: a dynamic role of the mount, revoked after. A client that is not
//! installed is skipped (see `harness::compat::client_available`).

use std::path::Path;
use std::time::Duration;

use crate::harness::compat::{CompatRow, client_available, repo, run_script};
use crate::harness::root;
use crate::harness::unix::{socket_dir, socket_path, start};

const PG8000: &str = "import json, os, pg8000.native
c = pg8000.native.Connection(user='readonly', database='myapp', unix_sock=os.environ['LG_SOCKET'])
print(json.dumps({'user': c.run('select current_user::text')[0][0]}))
c.close()
";
const POSTGRES_JS: &str = "import(process.argv[1]).then(async ({default: postgres}) => {
  const sql = postgres({path: process.env.LG_SOCKET, database: 'myapp', username: 'readonly'});
  const [r] = await sql`select current_user::text as u`;
  console.log(JSON.stringify({user: r.u}));
  await sql.end();
}).catch((e) => { console.log(JSON.stringify({error: String(e)})); process.exit(1); });";
const PSYCOPG2: &str = "import json, os, psycopg2
c = psycopg2.connect(host=os.environ['LG_SOCKET_DIR'], port=os.environ['LG_PORT'], dbname='myapp', user='readonly')
cur = c.cursor(); cur.execute('select current_user::text')
print(json.dumps({'user': cur.fetchone()[0]}))
c.close()
";
const DBD_PG: &str = "use DBI; use JSON::PP;
my $d = DBI->connect(\"dbi:Pg:host=$ENV{LG_SOCKET_DIR};port=$ENV{LG_PORT};dbname=myapp\", 'readonly', '', {RaiseError => 1});
my ($u) = $d->selectrow_array('select current_user::text');
print encode_json({user => $u}), \"\\n\"; $d->disconnect;";

/// One client to run over the socket.
struct SocketClient<'a> {
    /// Its compatibility-table row file.
    slug: &'a str,
    /// Sort key of its table row.
    order: u32,
    /// The table row it merges into.
    client: &'a str,
    /// What the row lists.
    feature: &'a str,
    /// The program and its arguments (a one-line script).
    program: &'a str,
    args: Vec<&'a str>,
    /// Arguments of the program that exit 0 when the client is installed.
    probe: Vec<&'a str>,
    /// How to install it.
    install: &'a str,
}

/// Runs `program args…` with the socket in the environment; returns the `user` it printed.
async fn user_over(program: &str, args: &[&str], dir: &Path, port: u16) -> String {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("LG_SOCKET_DIR", dir)
        .env("LG_SOCKET", socket_path(dir, port))
        .env("LG_PORT", port.to_string());
    let run = run_script(cmd, program, Duration::from_secs(60)).await;
    run.assert_ok();
    run.result["user"].as_str().unwrap_or("").to_string()
}

/// Whether `program args…` exits 0 (the client is installed), saying how to install it if not.
fn installed(client: &str, program: &str, args: &[&str], install: &str) -> bool {
    let probe = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output();
    client_available(client, probe, install)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg8000_postgres_js_lib_pq_psycopg2_and_dbd_pg_over_the_socket() {
    let dir = socket_dir();
    let (f, _audit) = start(
        "unix-clients",
        dir.path(),
        Some("0666"),
        &["unix:user=root"],
    )
    .await;
    let port = f.proxy.port;
    let postgres_js = repo().join("tests/clients/node/node_modules/postgres/src/index.js");
    let postgres_js = postgres_js.display().to_string();
    let build = root().tempdir("libpq-unix-");
    let pq = build.path().join("pq_compat");
    let pq_text = pq.display().to_string();
    let clients = [
        SocketClient {
            slug: "pg8000-unix",
            order: 43,
            client: "pg8000 (Python, pure protocol)",
            feature: "Unix socket: unix_sock=<dir>/.s.PGSQL.<port>, no certificate",
            program: "python3",
            args: vec!["-c", PG8000],
            probe: vec!["-c", "import pg8000"],
            install: "pip install -r tests/clients/python/requirements.txt",
        },
        SocketClient {
            slug: "postgres-js-unix",
            order: 51,
            client: "Postgres.js `postgres` (pure JS)",
            feature: "Unix socket: path=<dir>/.s.PGSQL.<port>, no certificate",
            program: "node",
            args: vec!["-e", POSTGRES_JS, &postgres_js],
            probe: vec![
                "-e",
                "require('fs').accessSync(process.argv[1])",
                &postgres_js,
            ],
            install: "npm ci --prefix tests/clients/node",
        },
        SocketClient {
            slug: "lib-pq-unix",
            order: 48,
            client: "lib/pq (Go, pure protocol)",
            feature: "Unix socket: host=<dir> sslmode=disable, no certificate",
            program: &pq_text,
            args: vec![],
            probe: vec!["version"],
            install: "apt-get install golang-go golang-github-lib-pq-dev",
        },
        SocketClient {
            slug: "psycopg2-unix",
            order: 41,
            client: "psycopg2 (Python, libpq)",
            feature: "Unix socket: host=<dir>, no certificate",
            program: "/usr/bin/python3",
            args: vec!["-c", PSYCOPG2],
            probe: vec!["-c", "import psycopg2"],
            install: "apt-get install python3-psycopg2",
        },
        SocketClient {
            slug: "dbd-pg-unix",
            order: 57,
            client: "Perl DBD::Pg (libpq)",
            feature: "Unix socket: dbi:Pg:host=<dir>, no certificate",
            program: "perl",
            args: vec!["-e", DBD_PG],
            probe: vec!["-MDBD::Pg", "-MJSON::PP", "-e1"],
            install: "apt-get install libdbd-pg-perl",
        },
    ];
    for SocketClient {
        slug,
        order,
        client,
        feature,
        program,
        args,
        probe,
        install,
    } in clients
    {
        let available = if slug == "lib-pq-unix" {
            installed(client, "go", &probe, install)
        } else {
            installed(client, program, &probe, install)
        };
        if !available {
            continue;
        }
        if slug == "lib-pq-unix" {
            crate::compat_pgx::build_go("tests/clients/go-libpq", &pq, install).await;
        }
        let mut row = CompatRow::new(slug, order, client, "");
        row.step(feature);
        let user = user_over(program, &args, dir.path(), port).await;
        assert!(
            user.starts_with(&f.mount.prefix),
            "{client} over the socket: {user:?}"
        );
    }
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
