#!/bin/sh
# The cluster scenario's vault password, as an operator's --vault-password-file:
# made once per scenario run, in its ephemeral folder, and printed.
set -eu
file="${MOLECULE_EPHEMERAL_DIRECTORY:?run by molecule}/vault-password"
if [ ! -s "$file" ]; then
  umask 077
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file"
fi
cat "$file"
