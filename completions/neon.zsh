
#compdef neon

_neon_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _NEON_COMPLETE=complete_zsh neon)
}

compdef _neon_completion neon

