"""vlmerge.data"""
