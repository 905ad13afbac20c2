"""What the person watching a run sees: rank 0 announces each metrics record to a small actor the driver
owns (`monitor`), and the driver draws it (`view`): a progress bar on a terminal, plain lines in a log."""
