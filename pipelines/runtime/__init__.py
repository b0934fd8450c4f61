"""What every command needs before its own work: Ray started the same way everywhere
(``cluster``), and its inputs resolved: the model checkpoint and a generated catalog (``inputs``)."""
