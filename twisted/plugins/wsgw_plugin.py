from twisted.application.service import ServiceMaker

wsgw = ServiceMaker(
    "wsgw",
    "wsgw.tap",
    "WebSocket gateway: clients at /ws, events to the app, the app's API at /tapr/ws/conn/",
    "wsgw",
)
