"""One client per outside service, each created once and handed its session and settings.

PocketBase (`pocketbase`, with the collection's fields in use in `layout` and its schema in `schema`), the
image providers behind one seam (`provider`: `jimeng` and `ark`), the bucket (`storage`), downloads of image
links (`download`), one image from its link or its bytes into the bucket (`transfer`), and the event-stream
parser of PocketBase's realtime API (`sse`).
"""
