"""A trained model, used: the registry (candidate and champion), the serving contract, the
scoring server and predictions on image files.
"""
