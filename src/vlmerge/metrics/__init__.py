"""vlmerge.metrics"""
