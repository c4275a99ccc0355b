# Shared by the launch scripts (sourced, not run): command printing and --dry-run.
# shellcheck shell=bash
# Quote one word for a POSIX shell only where it needs it.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

DRY_RUN=0
run() {
  local out='+' a
  for a in "$@"; do out+=" $(q "$a")"; done
  if (( DRY_RUN )); then
    echo "$out"
  else
    echo "$out" >&2
    "$@"
  fi
}
