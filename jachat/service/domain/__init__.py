"""The domain every layer speaks: errors with neutral kinds and field paths, results, sampling options."""
