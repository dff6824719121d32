#!/usr/bin/env bash
# One of the two end-to-end workers of make test (test-inner.sh). It runs test files one at a time: from the front
# of its own homeserver's queue, and once that is empty from the back of the other's, so that both workers end at
# about the same time. Queues are files of "index path" lines in DIR; each test file's output and exit status go
# to DIR/<homeserver>-<index>.log and .status.
#
#   scripts/e2e-worker.sh DIR OWN OTHER     (OWN, OTHER: dendrite or synapse)
set -uo pipefail
cd "$(dirname "$0")/.."
dir=$1 own=$2 other=$3

# take QUEUE front|back prints the queue's first or last line and removes it; it fails when the queue is empty.
take() {
	local queue=$dir/queue-$1 line=""
	until mkdir "$dir/lock" 2>/dev/null; do sleep 0.1; done
	if [ -s "$queue" ]; then
		if [ "$2" = front ]; then
			line=$(head -n 1 "$queue")
			sed -i 1d "$queue"
		else
			line=$(tail -n 1 "$queue")
			sed -i '$d' "$queue"
		fi
	fi
	rmdir "$dir/lock"
	[ -n "$line" ] && echo "$line"
}

while :; do
	if job=$(take "$own" front); then
		hs=$own
	elif job=$(take "$other" back); then
		hs=$other
	else
		break
	fi
	index=${job%% *} file=${job#* }
	FERRY_E2E_HS=$hs scripts/e2e.sh "$file" >"$dir/$hs-$index.log" 2>&1
	echo $? >"$dir/$hs-$index.status"
done
