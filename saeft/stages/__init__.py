"""One module per ``saeft <command>`` stage; a stage imports helpers below it, never another stage."""
