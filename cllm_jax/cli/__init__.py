"""The command lines' code, one module per subcommand of decode.py and train.py's shared runner.

decode.py and train.py only dispatch: common.py turns a subcommand table into an exit status (errors
a user can fix as one line), decoding.py holds the flags and setup every decoding command shares.
"""
