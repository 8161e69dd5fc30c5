# bash completion for mirrorline, mirrorline-source and mirrorline-target.
# shellcheck disable=SC2207  # COMPREPLY=($(compgen ...)) is the bash-completion idiom
# Installed by deploy/install.sh as PREFIX/share/bash-completion/completions/mirrorline
# (with mirrorline-source and mirrorline-target linked to it).
# The command list follows cli/grammar.py SYNOPSIS; tests/unit/test_deploy.py checks it.

_mirrorline() {
    local cur prev words cword
    if declare -F _init_completion >/dev/null 2>&1; then
        _init_completion || return
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD-1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi
    local commands="status connect disconnect replication wait failover mirror verify
        orphans restore failback queuetask tasks taskprocessing keygen run help version"

    case $prev in
        --socket)
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --timeout)
            return ;;
    esac

    # The command is the first word that is not a global option (or its argument).
    local i command="" nth=0
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --socket) ((i++)) ;;
            -*) ;;
            *) if [ -z "$command" ]; then command=${words[i]}; nth=0; else ((nth++)); fi ;;
        esac
    done

    if [ -z "$command" ]; then
        COMPREPLY=($(compgen -W "--socket --json --version --help $commands" -- "$cur"))
        return
    fi
    case $command in
        replication)
            [ "$nth" -eq 0 ] && COMPREPLY=($(compgen -W "start stop" -- "$cur"))
            [ "$nth" -ge 2 ] && COMPREPLY=($(compgen -W "clearrestorerequired" -- "$cur")) ;;
        mirror)
            if [ "$nth" -eq 0 ]; then
                COMPREPLY=($(compgen -W "start stop pause resume" -- "$cur"))
            elif [ "$nth" -ge 2 ]; then
                COMPREPLY=($(compgen -W "full different checksum newer orphans=remove
                    --wait --timeout" -- "$cur"))
            fi ;;
        verify)
            [ "$nth" -ge 1 ] && COMPREPLY=($(compgen -W "remirror --wait --timeout" -- "$cur")) ;;
        orphans)
            [ "$nth" -eq 0 ] && COMPREPLY=($(compgen -W "list remove move" -- "$cur"))
            [ "$nth" -ge 2 ] && COMPREPLY=($(compgen -W "olderthan=" -- "$cur")) ;;
        restore)
            [ "$nth" -ge 1 ] && COMPREPLY=($(compgen -W "overwrite newer checksum
                orphans=remove orphans=keep --wait --timeout" -- "$cur")) ;;
        connect)
            case $prev in
                key) COMPREPLY=($(compgen -f -- "$cur")) ;;
                *) [ "$nth" -ge 1 ] && COMPREPLY=($(compgen -W "to map key" -- "$cur")) ;;
            esac ;;
        wait)
            [ "$nth" -eq 0 ] && COMPREPLY=($(compgen -W "queue" -- "$cur"))
            [ "$nth" -ge 2 ] && COMPREPLY=($(compgen -W "--timeout" -- "$cur")) ;;
        queuetask)
            [ "$nth" -ge 2 ] && COMPREPLY=($(compgen -W "on=queue on=transmit on=receive
                on=execute timeout= --wait --timeout --" -- "$cur")) ;;
        taskprocessing)
            [ "$nth" -eq 0 ] && COMPREPLY=($(compgen -W "enable disable" -- "$cur")) ;;
        keygen)
            COMPREPLY=($(compgen -f -W "--force" -- "$cur")) ;;
        run)
            [ "$nth" -eq 0 ] && COMPREPLY=($(compgen -f -W "-" -- "$cur")) ;;
        help)
            [ "$nth" -eq 0 ] && COMPREPLY=($(compgen -W "$commands" -- "$cur")) ;;
    esac
}

_mirrorline_agent() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    case $prev in
        --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --log-level) COMPREPLY=($(compgen -W "debug info warning error" -- "$cur")); return ;;
    esac
    COMPREPLY=($(compgen -W "--config --log-level --check-config --help" -- "$cur"))
}

complete -F _mirrorline mirrorline
complete -F _mirrorline_agent mirrorline-source mirrorline-target
