from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

urlpatterns = [
    path("", include("chat.urls")),
]
# Empty unless DEBUG: in production the reverse proxy serves STATIC_ROOT.
urlpatterns += staticfiles_urlpatterns()
