"""One module per `fedprompt` sub-command."""
