#!/usr/bin/env bash
# Fails when a source file includes a project header from a room it may not
# use (docs/architecture.md, "Rooms and what each may use"). The build
# enforces the same rules through each room's include view (CMakeLists.txt,
# pw_room); this check names every offending line at once, with the rule.
#
#   bash scripts/check-layering.sh
#
# A room is a directory; a file belongs to the deepest room that contains
# it. Headers named with their room ("runtime/status.h") are the only
# project includes; system headers (<...>) are not checked.
set -euo pipefail
cd "$(dirname "$0")/.."

# room: the rooms its files may include from (itself always).
declare -A USES=(
    [runtime]=""
    [graph]="runtime"
    [scheduler]="runtime"
    [scheduler/analysis]="runtime scheduler"
    [stages/ops]="runtime graph"
    [stages/program]="runtime graph scheduler stages/ops"
    [stages/train]="runtime graph scheduler stages/ops stages/program"
    [stages/plan]="runtime graph scheduler scheduler/analysis stages/ops stages/program"
)
# Rooms ordered deepest first, so a file takes the most specific one.
mapfile -t ROOMS < <(for r in "${!USES[@]}"; do echo "$r"; done | awk '{print length($0) " " $0}' | sort -rn | cut -d' ' -f2-)

room_of() { # path -> room, or nothing for a file outside the library
    local f=$1 r
    for r in "${ROOMS[@]}"; do
        case "$f" in "$r"/*) echo "$r"; return ;; esac
    done
}

bad=0
checked=0
while IFS= read -r f; do
    from=$(room_of "$f")
    [ -n "$from" ] || continue
    checked=$((checked + 1))
    while IFS=: read -r line inc; do
        to=$(room_of "$inc")
        if [ -z "$to" ]; then
            echo "$f:$line: includes \"$inc\", which is in no room of the library" >&2
            bad=$((bad + 1))
            continue
        fi
        [ "$to" = "$from" ] && continue
        ok=0
        for u in ${USES[$from]}; do [ "$u" = "$to" ] && ok=1; done
        if [ $ok = 0 ]; then
            echo "$f:$line: $from may not include \"$inc\" ($to); $from may use: ${USES[$from]:-nothing else}" >&2
            bad=$((bad + 1))
        fi
    done < <(grep -n '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$f" | sed -E 's/^([0-9]+):[^"]*"([^"]+)".*/\1:\2/')
done < <(git ls-files 'runtime/*' 'graph/*' 'scheduler/*' 'stages/*' | grep -E '\.(c|h|cu)$')

if [ $bad -gt 0 ]; then
    echo "check-layering: $bad forbidden include(s) (docs/architecture.md)" >&2
    exit 1
fi
echo "check-layering: OK ($checked files, ${#ROOMS[@]} rooms)"
