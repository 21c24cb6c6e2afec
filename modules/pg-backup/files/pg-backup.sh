#!/bin/sh
# pg-backup: nightly logical backups of PostgreSQL databases.
#
# For each database in $DATABASES: `pg_dump -Fc` into $BACKUP_DIR/<db>-YYYY-MM-DD-HHMMSS.dump,
# verify the dump with `pg_restore --list` (a dump that fails is deleted, never kept), then
# delete that database's dumps older than $RETENTION_DAYS days. A database whose dump failed
# keeps all its old dumps: retention never eats the last good backup.
# Mirrors the VLog `postgres-backup` CronJob (02:00 daily, 7-day retention).
#
# Usage: pg-backup [-c ENV_FILE] [DB ...]
#   ENV_FILE  default $PG_BACKUP_CONFIG or /usr/local/etc/pg-backup/pg-backup.env
#   DB ...    back up only these databases instead of $DATABASES
# Environment (normally from ENV_FILE): DATABASES, BACKUP_DIR, RETENTION_DAYS, PG_BIN_DIR,
#   METRICS_FILE (optional node_exporter textfile), and libpq's PGHOST, PGPORT, PGUSER,
#   PGPASSFILE, PGSSLMODE. The password is only ever read from PGPASSFILE.
# Exit status: 0 all dumps verified, 1 some database failed, 2 usage or setup error.

set -eu

log() { printf '%s pg-backup: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
die() { log "error: $*" >&2; exit 2; }

config=${PG_BACKUP_CONFIG:-/usr/local/etc/pg-backup/pg-backup.env}
while getopts c:h opt; do
    case $opt in
        c) config=$OPTARG ;;
        h) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "usage: pg-backup [-c ENV_FILE] [DB ...]" ;;
    esac
done
shift $((OPTIND - 1))

if [ -e "$config" ]; then
    [ -r "$config" ] || die "cannot read $config"
    set -a
    # shellcheck source=/dev/null
    . "$config"
    set +a
fi

[ "$#" -gt 0 ] && DATABASES=$*
: "${DATABASES:?no databases: set DATABASES or name them on the command line}"
: "${BACKUP_DIR:?BACKUP_DIR is not set}"
RETENTION_DAYS=${RETENTION_DAYS:-7}
case $RETENTION_DAYS in
    '' | *[!0-9]*) die "RETENTION_DAYS must be a whole number of days, not '$RETENTION_DAYS'" ;;
esac
[ "$RETENTION_DAYS" -ge 1 ] || die "RETENTION_DAYS must be at least 1"

pg_dump=pg_dump
pg_restore=pg_restore
if [ -n "${PG_BIN_DIR:-}" ]; then
    pg_dump=$PG_BIN_DIR/pg_dump
    pg_restore=$PG_BIN_DIR/pg_restore
fi
command -v "$pg_dump" >/dev/null 2>&1 || die "pg_dump not found ($pg_dump)"
command -v "$pg_restore" >/dev/null 2>&1 || die "pg_restore not found ($pg_restore)"

umask 077
mkdir -p "$BACKUP_DIR" || die "cannot create $BACKUP_DIR"

# One run at a time: a second run while the first still dumps would race on pruning.
lock=$BACKUP_DIR/.pg-backup.lock
mkdir "$lock" 2>/dev/null || die "another pg-backup holds $lock (remove it if no pg-backup is running)"
tmp=
cleanup() {
    [ -n "$tmp" ] && rm -f "$tmp"
    rmdir "$lock" 2>/dev/null || :
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

stamp=$(date -u +%Y-%m-%d-%H%M%S)
ok=0
failed=0
failed_dbs=

for db in $DATABASES; do
    case $db in
        */* | .*) log "skipping unsafe database name '$db'"; failed=$((failed + 1)); failed_dbs="$failed_dbs $db"; continue ;;
    esac
    out=$BACKUP_DIR/$db-$stamp.dump
    tmp=$out.partial
    log "dumping $db to $out"
    if ! "$pg_dump" --format=custom --no-password --dbname="$db" --file="$tmp"; then
        log "FAILED: pg_dump of $db; partial dump removed" >&2
        rm -f "$tmp"; tmp=
        failed=$((failed + 1)); failed_dbs="$failed_dbs $db"
        continue
    fi
    # The assignment's status is pg_restore's own (a pipeline would report grep's instead).
    if ! toc=$("$pg_restore" --list "$tmp"); then
        log "FAILED: $db dump does not pass pg_restore --list; corrupt dump removed" >&2
        rm -f "$tmp"; tmp=
        failed=$((failed + 1)); failed_dbs="$failed_dbs $db"
        continue
    fi
    entries=$(printf '%s\n' "$toc" | grep -c -v '^;' || :)
    mv "$tmp" "$out"; tmp=
    log "verified $out ($(wc -c <"$out" | tr -d ' ') bytes, $entries TOC entries)"
    ok=$((ok + 1))

    # Retention, per database and only after a verified dump. -mtime +N (POSIX) matches files
    # modified more than N+1 days ago, hence N-1: a 7-day retention keeps the last 7 days.
    find "$BACKUP_DIR/." ! -name . -prune -type f \
        -name "$db-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]-[0-9][0-9][0-9][0-9][0-9][0-9].dump" \
        -mtime +"$((RETENTION_DAYS - 1))" -print | while IFS= read -r old; do
        rm -f "$old" && log "pruned $BACKUP_DIR/${old##*/} (older than $RETENTION_DAYS days)"
    done
done

if [ -n "${METRICS_FILE:-}" ]; then
    {
        echo "# HELP pg_backup_last_run_timestamp_seconds End of the last pg-backup run."
        echo "# TYPE pg_backup_last_run_timestamp_seconds gauge"
        echo "pg_backup_last_run_timestamp_seconds $(date +%s)"
        echo "# HELP pg_backup_databases Databases by outcome of the last pg-backup run."
        echo "# TYPE pg_backup_databases gauge"
        echo "pg_backup_databases{outcome=\"verified\"} $ok"
        echo "pg_backup_databases{outcome=\"failed\"} $failed"
    } >"$METRICS_FILE.$$" && chmod 0644 "$METRICS_FILE.$$" && mv "$METRICS_FILE.$$" "$METRICS_FILE"
fi

if [ "$failed" -gt 0 ]; then
    log "done: $ok verified, $failed failed:$failed_dbs" >&2
    exit 1
fi
log "done: $ok verified"
