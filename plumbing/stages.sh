# Sourced by pipeline.sh and the study's drivers (study/*.sh): flags declared one way, one line of
# help each, and stages that are skipped only when their output was made by the same command.
#
#   flag NAME DEFAULT "help"     --NAME VALUE sets the variable NAME in upper case (flag seed 1 -> $SEED)
#   switch NAME "help"           --NAME sets it to 1 (else 0)
#   parse_flags "$@"             after the declarations; -h/--help prints the file's header and the flags
#   stage NAME DONE_FILE CMD...  runs CMD unless DONE_FILE exists from the same arguments (RAN says which)
#   STAGE_ROOT=DIR               the pipeline's folder: recorded as {pipeline}, so a moved or copied folder still matches
declare -A FLAG_KIND FLAG_DEFAULT FLAG_HELP
FLAG_ORDER=()
flag() { FLAG_KIND[$1]=value FLAG_DEFAULT[$1]=$2 FLAG_HELP[$1]=$3; FLAG_ORDER+=("$1"); }
switch() { FLAG_KIND[$1]=switch FLAG_DEFAULT[$1]=0 FLAG_HELP[$1]=$2; FLAG_ORDER+=("$1"); }

usage() {  # the calling script's header comment, then its flags
  sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Flags (default):"
  for name in "${FLAG_ORDER[@]}"; do
    if [ "${FLAG_KIND[$name]}" = switch ]; then printf '  --%-22s %s\n' "$name" "${FLAG_HELP[$name]}"
    else printf '  --%-22s %s%s\n' "$name VALUE" "${FLAG_HELP[$name]}" "${FLAG_DEFAULT[$name]:+ (${FLAG_DEFAULT[$name]})}"; fi
  done
}

parse_flags() {
  local name
  for name in "${FLAG_ORDER[@]}"; do printf -v "${name^^}" '%s' "${FLAG_DEFAULT[$name]}"; done
  while [ $# -gt 0 ]; do
    name=${1#--}
    case "$1" in -h|--help) usage; exit 0 ;; esac
    if [ "${1:0:2}" != -- ] || [ -z "${FLAG_KIND[$name]+x}" ]; then
      echo "$(basename "$0"): unknown argument '$1' (see --help)" >&2; exit 2
    fi
    if [ "${FLAG_KIND[$name]}" = switch ]; then printf -v "${name^^}" 1; shift; continue; fi
    if [ $# -lt 2 ]; then echo "$(basename "$0"): $1 needs a value" >&2; exit 2; fi
    printf -v "${name^^}" '%s' "$2"
    shift 2
  done
}

flag_lines() {  # one argument a line -> one flag with its value a line (what a person reads in a diff)
  awk '/^--/ { if (f) print f; f = $0; next } { if (f) { print f " " $0; f = "" } else print } END { if (f) print f }'
}

RAN=0
stage() {  # stage NAME DONE_FILE COMMAND...: skipped when DONE_FILE exists from the same arguments (unless --force)
  local name="$1" done_file="$2"; shift 2
  local dir record args
  dir=$(dirname "$done_file") record="$(dirname "$done_file")/pipeline_args.txt" args=$(root_to_placeholder "${@:2}")  # the interpreter aside
  if [ "${FORCE:-0}" = 0 ] && [ -e "$done_file" ]; then
    if [ -f "$record" ] && { [ "$(cat "$record")" = "$args" ] || [ "$(cat "$record")" = "$(printf '%s\n' "${@:2}")" ]; }; then  # or a record of literal paths
      echo "== $name: $done_file exists, made by this command: skipped (--force reruns it)"
      RAN=0
      return
    fi
    echo "$(basename "$0"): $name: $dir was made by another command than this one (other budgets or flags):" >&2
    diff <([ -f "$record" ] && flag_lines < "$record" || echo "(no $record: not made by this pipeline)") <(echo "$args" | flag_lines) \
      | grep '^[<>]' | sed 's/^</  made with:/; s/^>/  this run: /' >&2
    echo "$(basename "$0"): rerun it with --force (the earlier output is moved to OUT/replaced/), or choose another --out" >&2
    exit 1
  fi
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then  # an unfinished or replaced output: set aside, never deleted
    local aside; aside="$(dirname "$dir")/replaced/$(basename "$dir")-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$(dirname "$aside")" && mv "$dir" "$aside"
    echo "== $name: the earlier $dir moved to $aside"
  fi
  echo "== $name"
  local t0; t0=$(date +%s)
  "$@"
  mkdir -p "$dir" && echo "$args" > "$record"
  echo "== $name: $(( $(date +%s) - t0 )) s"
  RAN=1
}

root_to_placeholder() {  # an argument a line, the pipeline's folder ($STAGE_ROOT) written {pipeline}
  local a root="${STAGE_ROOT%/}"
  for a in "$@"; do
    if [ -n "$root" ]; then [ "$a" = "$root" ] && a="{pipeline}"; a=${a//"$root/"/"{pipeline}/"}; fi
    printf '%s\n' "$a"
  done
}

stage_args() {  # stage_args DIR [ROOT]: the arguments (the script, then its flags) a finished stage in DIR was run with, a
  # line each, {pipeline} read as ROOT (default: STAGE_ROOT where the caller set it, else DIR's parent)
  if [ ! -f "$1/pipeline_args.txt" ]; then echo "$(basename "$0"): $1 holds no stage made by pipeline.sh (no pipeline_args.txt)" >&2; exit 1; fi
  local line root="${2:-${STAGE_ROOT:-$(dirname "$1")}}"; root="${root%/}"  # a trailing slash ignored, as root_to_placeholder does
  while IFS= read -r line; do printf '%s\n' "${line//"{pipeline}"/"$root"}"; done < "$1/pipeline_args.txt"
}

flag_of() {  # flag_of DIR NAME: the value of --NAME in the stage's arguments (the last one given)
  stage_args "$1" | awk -v flag="--$2" 'prev == flag { value = $0 } { prev = $0 } END { print value }'
}
